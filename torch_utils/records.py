"""Format-tagged records: a network's weights with plain data about it, for the helper networks that are not
generator snapshots (the downstream segmenter, the U-Net inpainting baseline).

A record is a dict ``{format, state_dict, ...plain fields}`` written atomically with ``torch.save`` and read with
``torch.load(weights_only=True)``, so no code comes out of the file; ``format`` ('name/version') says which reader
it is for, and the reader rebuilds the network from its own classes and the plain fields.
"""

import os

import torch

import dnnlib


def save_record(
    path: str,                      # output .pt, written atomically
    fmt: str,                       # the record's format tag, e.g. 'mri-gan-segmenter/1'
    model: torch.nn.Module,         # its weights go into 'state_dict' (a CPU copy)
    **fields,                       # plain data (dicts, lists, strings, numbers) beside them
) -> None:
    """Write ``{format, **fields, state_dict}``; a killed write leaves no half file."""
    data = dict(format=fmt, **fields,
                state_dict={k: v.detach().cpu().clone() for k, v in model.state_dict().items()})
    with dnnlib.atomic_output(path, suffix='.pt') as tmp:
        torch.save(data, tmp)


def load_record(
    path: str,                      # a file written by save_record
    fmt: str,                       # the format tag it must carry
    what: str,                      # what the file is, for messages: 'segmenter checkpoint'
    writer: str,                    # who writes such files, for messages: 'calc_segmentation.py'
    error=ValueError,               # the exception class raised, with a one-line message
) -> dict:
    """The record's dict (on the CPU); ``error`` for a missing, unreadable or foreign file."""
    if not os.path.isfile(path):
        raise error(f'{path}: no such {what}')
    try:
        data = torch.load(path, map_location='cpu', weights_only=True)
    except Exception as err:  # torch raises many types for corrupt or foreign files.
        raise error(f'{path}: not a readable {what} ({type(err).__name__})') from None
    if not isinstance(data, dict) or data.get('format') != fmt:
        article = 'an' if what[:1] in 'aeiou' else 'a'
        raise error(f'{path}: not {article} {what} of {writer}')
    return data


def load_weights(model: torch.nn.Module, record: dict, path: str, network: str, error=ValueError) -> torch.nn.Module:
    """``model`` with the record's state_dict loaded; ``error`` naming ``network`` when the weights do not fit."""
    try:
        model.load_state_dict(record['state_dict'])
    except RuntimeError as err:
        raise error(f'{path}: weights do not fit {network} ({str(err).splitlines()[0][:160]})') from None
    return model
