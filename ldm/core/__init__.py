"""The diffusion math below both the networks (`ldm.modules`) and the samplers (`ldm.sampling`): the noise schedule,
the parameterizations and their scalings, the denoiser that combines network and scaling, the noise levels' spacing,
and the algebra that training and sampling share (classifier-free guidance's combination, the DDIM step).
It imports nothing else of the framework."""
