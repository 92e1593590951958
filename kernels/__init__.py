"""Triton kernels and their pure-torch references."""

# --- noise / noisy LoRA / ZO update (issue #3) ---------------------------------------------------
from .noise import derive_seed, randn, randn_triton
from .lora import lora_noise, noisy_lora_linear
from .zo_update import zo_update_

__all__ = ["derive_seed", "randn", "randn_triton", "lora_noise", "noisy_lora_linear", "zo_update_"]
# --- end issue #3 block (other blocks: extend with `__all__ += [...]`) ----------------------------
