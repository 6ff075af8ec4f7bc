from .sdi_generator import PreActResBlock, SDIGenerator, create_sdi_generator
