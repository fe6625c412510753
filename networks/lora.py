"""`--network_module networks.lora`: sd-scripts' plugin entry points (spec/sd-scripts.md §0, §7.5) mapped onto
trainer's `LoRANetwork`; networks/loha.py and lokr.py reuse them. Only argument translation lives here."""

from __future__ import annotations

import logging

from trainer.config.args import NETWORK_ARGS_BY_MODULE, parse_network_args
from trainer.network.lora import LoRANetwork, apply_lr_options, network_from_args, read_weights_file

logger = logging.getLogger(__name__)


def _text_encoders(text_encoder) -> list:
    """sd-scripts passes one CLIPTextModel for SD1.x/SD2.x and a list [te1, te2] for SDXL."""
    return list(text_encoder) if isinstance(text_encoder, (list, tuple)) else [text_encoder]


def _options(kwargs: dict, sdxl: bool, module: str = "networks.lora") -> dict[str, str]:
    """The --network_args `module` understands, checked like the command line's (values arrive as strings);
    other keys are warned about and ignored, as sd-scripts ignores them."""
    known = NETWORK_ARGS_BY_MODULE[module]
    for key in kwargs:
        if key not in known:
            logger.warning("--network_args %s is not used by %s and is ignored", key, module)
    return parse_network_args([f"{k}={v}" for k, v in kwargs.items() if k in known and v is not None],
                              sdxl=sdxl, network_module=module)


def create_network(multiplier, network_dim, network_alpha, vae, text_encoder, unet, neuron_dropout=None,
                   _module: str = "networks.lora", **kwargs) -> LoRANetwork:
    """Build the LoRA as train_network.py asks for it (block-wise ranks and lrs and LoRA+ included); `dropout`
    in kwargs is ignored (sd-scripts takes neuron dropout from --network_dropout, passed as neuron_dropout)."""
    text_encoders = _text_encoders(text_encoder)
    sdxl = len(text_encoders) == 2
    return network_from_args(
        text_encoders, unet, _options(kwargs, sdxl, _module), sdxl=sdxl,
        rank=4 if network_dim is None else int(network_dim),
        alpha=1.0 if network_alpha is None else network_alpha,  # an int stays int: the int64-alpha QUIRK
        dropout=neuron_dropout, multiplier=multiplier, network_module=_module)


def create_network_from_weights(multiplier, file, vae, text_encoder, unet, weights_sd=None, for_inference=False,
                                _module: str = "networks.lora", **kwargs) -> tuple[LoRANetwork, dict]:
    """A network shaped like the file (its modules, ranks and alphas), with the weights already loaded; block lr
    weights and LoRA+ ratios in kwargs apply to its param groups. `for_inference` needs nothing different:
    every module can merge."""
    if weights_sd is None:
        weights_sd = read_weights_file(file)
    text_encoders = _text_encoders(text_encoder)
    sdxl = len(text_encoders) == 2
    network = LoRANetwork.from_weights(text_encoders, unet, weights_sd, sdxl=sdxl, multiplier=multiplier,
                                       source=str(file))
    apply_lr_options(network, _options(kwargs, sdxl, _module))
    return network, weights_sd
