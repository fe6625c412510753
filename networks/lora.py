"""`--network_module networks.lora`: sd-scripts' plugin entry points (spec/sd-scripts.md §0, §7.5) mapped onto
trainer's `LoRANetwork`. Only argument translation lives here."""

from __future__ import annotations

import logging

from trainer.errors import ConfigError
from trainer.network.lora import LoRANetwork, read_weights_file

logger = logging.getLogger(__name__)

# sd-scripts' networks.lora understands these too; silently ignoring them would train something else.
NOT_SUPPORTED_YET = ("block_dims", "block_alphas", "conv_block_dims", "conv_block_alphas", "down_lr_weight",
                     "mid_lr_weight", "up_lr_weight", "block_lr_zero_threshold", "loraplus_lr_ratio",
                     "loraplus_unet_lr_ratio", "loraplus_text_encoder_lr_ratio")
KNOWN = ("conv_dim", "conv_alpha", "rank_dropout", "module_dropout", "dropout")


def _text_encoders(text_encoder) -> list:
    """sd-scripts passes one CLIPTextModel for SD1.x/SD2.x and a list [te1, te2] for SDXL."""
    return list(text_encoder) if isinstance(text_encoder, (list, tuple)) else [text_encoder]


def _number(kwargs: dict, key: str, kind):
    """--network_args values arrive as strings ("4", "0.1")."""
    value = kwargs.get(key)
    if value is None or value == "None":
        return None
    try:
        return kind(value)
    except (TypeError, ValueError):
        raise ConfigError(f"--network_args {key}={value!r}: expected a{'n integer' if kind is int else ' number'}") from None


def create_network(multiplier, network_dim, network_alpha, vae, text_encoder, unet, neuron_dropout=None,
                   **kwargs) -> LoRANetwork:
    """Build the LoRA as train_network.py asks for it; `dropout` in kwargs is ignored (sd-scripts takes
    neuron dropout from --network_dropout, passed as neuron_dropout)."""
    refused = [k for k in kwargs if k in NOT_SUPPORTED_YET]
    if refused:
        raise ConfigError([f"--network_args {k}: not supported yet by trainer's networks.lora; remove it" for k in refused])
    for key in kwargs:
        if key not in KNOWN:
            logger.warning("--network_args %s is not used by networks.lora and is ignored", key)
    text_encoders = _text_encoders(text_encoder)
    return LoRANetwork(
        text_encoders, unet, sdxl=len(text_encoders) == 2,
        rank=4 if network_dim is None else int(network_dim),
        alpha=1.0 if network_alpha is None else network_alpha,  # an int stays int: the int64-alpha QUIRK
        conv_rank=_number(kwargs, "conv_dim", int), conv_alpha=_number(kwargs, "conv_alpha", float),
        dropout=neuron_dropout, rank_dropout=_number(kwargs, "rank_dropout", float),
        module_dropout=_number(kwargs, "module_dropout", float), multiplier=multiplier)


def create_network_from_weights(multiplier, file, vae, text_encoder, unet, weights_sd=None, for_inference=False,
                                **kwargs) -> tuple[LoRANetwork, dict]:
    """A network shaped like the file (its modules, ranks and alphas), with the weights already loaded.
    `for_inference` needs nothing different: every module can merge."""
    if weights_sd is None:
        weights_sd = read_weights_file(file)
    text_encoders = _text_encoders(text_encoder)
    network = LoRANetwork.from_weights(text_encoders, unet, weights_sd, sdxl=len(text_encoders) == 2,
                                       multiplier=multiplier, source=str(file))
    return network, weights_sd
