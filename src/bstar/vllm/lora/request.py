"""vllm.lora.request: LoRARequest can be made (lm-eval and TRL build one only when asked for an adapter);
passing one that is not None to generate is refused with one line (no LoRA adapters here)."""

from dataclasses import dataclass


@dataclass
class LoRARequest:
    lora_name: str
    lora_int_id: int
    lora_path: str = ""
    base_model_name: str | None = None
    long_lora_max_len: int | None = None
    tensorizer_config_dict: dict | None = None
    load_inplace: bool = False

    @property
    def adapter_id(self) -> int:
        return self.lora_int_id

    @property
    def name(self) -> str:
        return self.lora_name

    @property
    def path(self) -> str:
        return self.lora_path
