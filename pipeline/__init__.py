"""restorl: RL fine-tuning of diffusion image restorers from IQA rewards."""

import logging

# diffusers imports peft, which imports bitsandbytes when it is installed (pyiqa pulls it in);
# on AVX-512 CPUs that warns about a 4-bit kernel restorl never uses, on every command.
logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
