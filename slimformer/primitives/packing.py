"""Bit packing of integer codes, 2..8 bits (1 also works), bit-exact.

One rule for every width: along the last dim, each run of 8 values becomes ``bits`` bytes, value
``i`` of the run occupying bits ``[i*bits, (i+1)*bits)`` of that little-endian ``bits``-byte word.
For 4 bits this is the familiar two-per-byte layout (even index in the low nibble); for 8 bits
it is the identity; 3 bits puts 8 values in 3 bytes. The packed row is trimmed to
``ceil(cols * bits / 8)`` bytes, so nothing is wasted beyond the last byte.

This is the canonical on-disk layout. Kernel layouts (e.g. PyTorch's blocked int4 layout) are
converted from it in :mod:`slimformer.formats`.
"""
from __future__ import annotations

import math

import torch

from slimformer.primitives.affine import QuantSpec


def packed_cols(cols: int, bits: int) -> int:
    """Bytes per packed row of ``cols`` values."""
    return math.ceil(cols * bits / 8)


def _check_bits(bits: int) -> None:
    if not 1 <= bits <= 8:
        raise ValueError(f"bits must be in 1..8, got {bits}")


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Unsigned codes [..., cols] with values in [0, 2^bits) -> uint8 [..., ceil(cols*bits/8)]."""
    _check_bits(bits)
    if codes.dtype not in (torch.uint8, torch.int16, torch.int32, torch.int64):
        raise ValueError(f"pack needs unsigned integer codes (uint8), got {codes.dtype}")
    lead, cols = codes.shape[:-1], codes.shape[-1]
    if bits == 8:
        return codes.to(torch.uint8).contiguous()
    if codes.numel() and int(codes.max()) >= (1 << bits):
        raise ValueError(f"code {int(codes.max())} does not fit in {bits} bits")
    c = codes.reshape(-1, cols).to(torch.int64)
    n8 = math.ceil(cols / 8)
    c = torch.nn.functional.pad(c, (0, n8 * 8 - cols)).reshape(-1, n8, 8)  # [R, n8, 8]
    shifts = torch.arange(8, dtype=torch.int64) * bits  # [8]
    word = (c << shifts).sum(dim=-1, keepdim=True)  # [R, n8, 1]; bit fields are disjoint
    byte_shifts = torch.arange(bits, dtype=torch.int64) * 8  # [bits]
    out = ((word >> byte_shifts) & 0xFF).to(torch.uint8).reshape(-1, n8 * bits)  # [R, n8*bits]
    out = out[:, : packed_cols(cols, bits)]
    return out.reshape(*lead, -1).contiguous()


def unpack(packed: torch.Tensor, bits: int, cols: int) -> torch.Tensor:
    """Inverse of :func:`pack`: uint8 [..., ceil(cols*bits/8)] -> uint8 [..., cols]."""
    _check_bits(bits)
    lead = packed.shape[:-1]
    if packed.shape[-1] != packed_cols(cols, bits):
        raise ValueError(f"packed rows have {packed.shape[-1]} bytes, expected "
                         f"{packed_cols(cols, bits)} for {cols} values of {bits} bits")
    if bits == 8:
        return packed.to(torch.uint8).contiguous()
    p = packed.reshape(-1, packed.shape[-1]).to(torch.int64)
    n8 = math.ceil(cols / 8)
    p = torch.nn.functional.pad(p, (0, n8 * bits - p.shape[1])).reshape(-1, n8, bits)  # [R, n8, bits]
    byte_shifts = torch.arange(bits, dtype=torch.int64) * 8
    word = (p << byte_shifts).sum(dim=-1, keepdim=True)  # [R, n8, 1]
    shifts = torch.arange(8, dtype=torch.int64) * bits
    vals = ((word >> shifts) & ((1 << bits) - 1)).reshape(-1, n8 * 8)[:, :cols]
    return vals.to(torch.uint8).reshape(*lead, cols).contiguous()


def to_unsigned(codes: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """Codes of ``spec`` -> uint8 in [0, 2^bits): signed int codes are offset by 2^(bits-1)."""
    if codes.dtype == torch.int8:
        return (codes.to(torch.int16) + (1 << (spec.bits - 1))).to(torch.uint8)
    return codes.to(torch.uint8)


def from_unsigned(u: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """Inverse of :func:`to_unsigned`: back to ``spec.code_dtype``."""
    if spec.code_dtype == torch.int8:
        return (u.to(torch.int16) - (1 << (spec.bits - 1))).to(torch.int8)
    return u.to(torch.uint8)


def pack_codes(codes: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """Codes of ``spec`` (any sign) -> packed uint8 bytes."""
    return pack(to_unsigned(codes, spec), spec.bits)


def unpack_codes(packed: torch.Tensor, spec: QuantSpec, cols: int) -> torch.Tensor:
    """Packed bytes -> codes of ``spec`` (``spec.code_dtype``)."""
    return from_unsigned(unpack(packed, spec.bits, cols), spec)
