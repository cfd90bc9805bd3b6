"""`python path/to/comfyui-fp8-clip quantize in.safetensors out.safetensors`: see cli.py."""
import sys

import fp8clip  # the pack folder is sys.path[0] when Python runs the folder

sys.exit(fp8clip.main())
