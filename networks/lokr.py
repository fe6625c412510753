"""`--network_module networks.lokr`: sd-scripts' plugin entry points for LoKr, mapped onto trainer's
network (trainer/network/lokr.py); the argument translation is networks/lora.py's."""

from __future__ import annotations

from networks import lora


def create_network(multiplier, network_dim, network_alpha, vae, text_encoder, unet, neuron_dropout=None, **kwargs):
    return lora.create_network(multiplier, network_dim, network_alpha, vae, text_encoder, unet, neuron_dropout,
                               _module="networks.lokr", **kwargs)


def create_network_from_weights(multiplier, file, vae, text_encoder, unet, weights_sd=None, for_inference=False,
                                **kwargs):
    return lora.create_network_from_weights(multiplier, file, vae, text_encoder, unet, weights_sd, for_inference,
                                            _module="networks.lokr", **kwargs)
