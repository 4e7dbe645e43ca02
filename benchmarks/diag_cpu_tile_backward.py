"""Why EPO costs more than GRPO on CPU: TRL's CPU fallback of the fused LM-head backward, one logits tile at a time.

    python benchmarks/diag_cpu_tile_backward.py [--tokens 1280] [--vocab 32768]

On CPU (no Triton), `trl.kernels.chunked_logprob._backward_tile` turns each [tokens x vocab-chunk] logits tile into
its gradient with unfused torch ops, each allocating a tile-sized temporary. When the loss uses the entropy (EPO, or
TRL's own `entropy_coef`), the tile also gets the entropy's gradient, -g_H * p * (log p + H): one more tile-sized
temporary and one more elementwise pass; GRPO alone skips it. This script times that function and measures its
peak allocation (profiler allocation events) with and without the entropy gradient, and compares it with a lean
in-place version of the same math (a possible upstream improvement; results identical to float32 rounding) that
needs the same memory either way. Nothing here is used by trl_epo.
"""

import argparse
import statistics
import time

import torch
from torch.profiler import ProfilerActivity, profile
from trl.kernels.chunked_logprob import _backward_tile


def lean_backward_tile(
    tile,
    tile_stride,
    targets,
    log_z,
    entropy,
    grad_logprobs,
    grad_entropy,
    vocab_start,
    n_cols,
    logit_scale,
    softcap,
    inv_t,
    HAS_SOFTCAP,
    HAS_LOGPROB_GRAD,
    HAS_ENTROPY_GRAD,
    BLOCK_SIZE,
):
    """`_backward_tile` (without softcapping) with in-place ops: two tile-sized temporaries whatever the outputs."""
    if HAS_SOFTCAP:
        raise NotImplementedError("the sketch covers models without final-logit softcapping")
    log_p = tile.float().mul(logit_scale * inv_t).sub_(log_z.unsqueeze(-1))
    p = torch.exp(log_p)
    if HAS_ENTROPY_GRAD:  # d H / d z_j = -p_j (log p_j + H)
        grad = log_p.add_(entropy.unsqueeze(-1)).mul_(p).mul_(-grad_entropy.unsqueeze(-1))
        if HAS_LOGPROB_GRAD:
            grad.addcmul_(p, grad_logprobs.unsqueeze(-1), value=-1.0)
    else:
        grad = p.mul_(-grad_logprobs.unsqueeze(-1)) if HAS_LOGPROB_GRAD else p.zero_()
    if HAS_LOGPROB_GRAD:  # d log p_target / d z_j = 1[j = target] - p_j
        local = targets - vocab_start
        rows = torch.nonzero((local >= 0) & (local < n_cols)).squeeze(-1)
        grad[rows, local[rows]] += grad_logprobs[rows]
    tile.copy_(grad.mul_(inv_t * logit_scale))


def peak_bytes(fn) -> int:
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted(
        (e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"
    )
    live = peak = 0
    for _, nbytes in events:
        live += nbytes
        peak = max(peak, live)
    return peak


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=1280)
    parser.add_argument("--vocab", type=int, default=32768)
    parser.add_argument("--repetitions", type=int, default=5)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(args.tokens, args.vocab, generator=g)
    targets = torch.randint(0, args.vocab, (args.tokens,), generator=g)
    log_z = torch.logsumexp(logits, -1)
    entropy = -(torch.softmax(logits, -1) * torch.log_softmax(logits, -1)).sum(-1)
    grad_logprobs, grad_entropy = torch.randn(args.tokens, generator=g), torch.randn(args.tokens, generator=g)
    tile_mib = args.tokens * args.vocab * 4 / 2**20
    print(f"tile: {args.tokens} tokens x {args.vocab} vocab, fp32 = {tile_mib:.0f} MiB; peak includes the tile's copy")
    print("| backward tile | entropy gradient | median s | peak MiB | peak / tile |")
    print("|---|---|---|---|---|")
    results = {}
    for name, fn in (("TRL _backward_tile", _backward_tile), ("lean in-place sketch", lean_backward_tile)):
        for with_entropy in (False, True):

            def call(fn=fn, with_entropy=with_entropy):
                tile = logits.clone()
                fn(
                    tile,
                    tile.stride(0),
                    targets,
                    log_z,
                    entropy,
                    grad_logprobs,
                    grad_entropy if with_entropy else log_z,
                    0,
                    args.vocab,
                    1.0,
                    1.0,
                    1.0,
                    False,
                    True,
                    with_entropy,
                    1024,
                )
                return tile

            times = []
            for _ in range(args.repetitions):
                start = time.perf_counter()
                call()
                times.append(time.perf_counter() - start)
            peak = peak_bytes(call)
            results[(name, with_entropy)] = call()
            print(
                f"| {name} | {'yes' if with_entropy else 'no'} | {statistics.median(times):.3f} | "
                f"{peak / 2**20:.0f} | {peak / 2**20 / tile_mib:.2f} |"
            )
    for with_entropy in (False, True):
        diff = (results[("TRL _backward_tile", with_entropy)] - results[("lean in-place sketch", with_entropy)]).abs()
        print(f"max |TRL - lean| (entropy gradient {'on' if with_entropy else 'off'}): {diff.max().item():.2e}")


if __name__ == "__main__":
    main()
