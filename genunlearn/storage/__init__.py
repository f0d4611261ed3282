"""Files on disk: atomic, safe weight files; the model cache; exports in the layouts timm and diffusers read."""
