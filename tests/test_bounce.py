"""Host-to-device copies through bounce buffers: the chunking on CPU, the streams on a GPU."""

from __future__ import annotations

import pytest
import torch

from asyncckpt.bounce import Bounce

DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64, torch.int64, torch.uint8,
          torch.bool, torch.complex64]


def _random(shape: tuple[int, ...], dtype: torch.dtype, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if dtype == torch.bool:
        return torch.rand(shape, generator=g) > 0.5
    if dtype.is_floating_point or dtype.is_complex:
        return torch.randn(shape, generator=g, dtype=dtype)
    return torch.randint(0, 200, shape, generator=g, dtype=dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("chunk_bytes", [1, 7, 64, 1 << 20])
def test_chunked_copy_is_exact_for_every_dtype_and_chunk_size(dtype: torch.dtype, chunk_bytes: int) -> None:
    bounce = Bounce("cpu", chunk_bytes=chunk_bytes)
    for seed, shape in enumerate([(1,), (13,), (5, 7), (3, 4, 9)]):
        src = _random(shape, dtype, seed)
        dst = torch.zeros(shape, dtype=dtype)
        bounce.copy(dst, src)
        assert torch.equal(dst, src), (shape, seed)
    bounce.finish()
    assert len(bounce._bufs) == 2  # two buffers, taken in turn and reused


def test_non_contiguous_source_and_fallbacks() -> None:
    bounce = Bounce("cpu", chunk_bytes=8)
    src = torch.arange(24.0).reshape(4, 6).t()                 # a transposed (strided) source
    dst = torch.zeros(6, 4)
    bounce.copy(dst, src)
    assert torch.equal(dst, src)
    wide = torch.zeros(4, 12)[:, ::2]                          # a strided destination: plain copy_
    bounce.copy(wide, src.t())
    assert torch.equal(wide, src.t())
    as64 = torch.zeros(6, 4, dtype=torch.float64)              # another dtype: copy_ converts
    bounce.copy(as64, src)
    assert torch.equal(as64, src.double())
    empty = torch.zeros(0, 3)
    bounce.copy(empty, torch.ones(0, 3))
    assert empty.shape == (0, 3)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_copies_through_pinned_buffers_land_before_finish_returns() -> None:
    bounce = Bounce("cuda", chunk_bytes=1 << 20)
    assert bounce.pin and bounce._stream is not None
    srcs = [_random((n,), torch.float32, n) for n in (1, 300_000, 1_000_001, 5)]
    dsts = [torch.full((s.numel(),), -1.0, device="cuda") for s in srcs]
    for d in dsts:
        d.mul_(2)                                              # queued on the current stream first
    for d, s in zip(dsts, srcs):
        bounce.copy(d, s)
    bounce.finish()
    assert all(b.is_pinned() for b in bounce._bufs) and len(bounce._bufs) == 2
    for d, s in zip(dsts, srcs):
        assert torch.equal(d.cpu(), s)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("compression", ["zstd", None])
def test_gpu_restore_of_tensors_larger_than_a_bounce_buffer_is_exact(tmp_path, compression) -> None:
    from asyncckpt import CheckpointManager, TrainState

    model = torch.nn.Linear(4096, 3000).cuda()                  # a 49 MB weight: two 32 MiB chunks
    opt = torch.optim.AdamW(model.parameters())
    model(torch.randn(4, 4096, device="cuda")).sum().backward()
    opt.step()
    state = TrainState(model=model, optimizer=opt)
    ref = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    ref_avg = opt.state[model.weight]["exp_avg"].cpu().clone()
    with CheckpointManager(tmp_path / "ck", compression=compression) as mgr:
        mgr.save(1, state, blocking=True)
        with torch.no_grad():
            model.weight.mul_(-3)
            opt.state[model.weight]["exp_avg"].add_(5)
        assert mgr.restore(state) == 1
    for k, v in model.state_dict().items():
        assert v.is_cuda and torch.equal(v.cpu(), ref[k]), k
    assert torch.equal(opt.state[model.weight]["exp_avg"].cpu(), ref_avg)
