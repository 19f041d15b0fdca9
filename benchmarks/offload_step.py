"""SNOO's outer step with its state in pinned host memory (``state_device="cpu"``) against the PCIe transfer floor.

For the parameters of GPT-2 small (124M, see outer_step_gpu.py) on the GPU, in float32 and in bf16, with float32
slow weights and momentum in pinned host memory, CUDA events time:

- the transfer floor: the state's bytes host-to-device then device-to-host on one stream (``serial``), and both
  directions at once on two streams (``duplex``, what a full-duplex bus allows);
- the streamed outer step (:class:`snoo.optim.offload.HostOffload`, what SNOO runs) at several chunk sizes, with the
  extra GPU memory it took (peak allocated during the step, over what was allocated before);
- the host-arithmetic outer step that SNOO ran before (``outer_step`` on host state: the fast weights copied to the
  host, the update computed by the CPU, the new weights copied back).

Target (issue 14): the streamed step within 2x of the serial floor, with extra GPU memory about one chunk of state.
Prints a markdown table. ``--quick`` runs a tiny model on the CPU (the same chunked code with ordinary tensors), for
the test that keeps this script from rotting; its numbers mean nothing.

    PYTHONPATH=src python benchmarks/offload_step.py [--repeats 10] [--chunks 20,22,24] [--quick]
"""

from __future__ import annotations

import argparse

import torch

from outer_step_gpu import gpt2_small, nbytes, timer
from snoo.optim.offload import DEFAULT_CHUNK_NUMEL, HostOffload
from snoo.optim.outer import outer_step


def transfer_floors(
    state: list[torch.Tensor], device: torch.device, measure, repeats: int
) -> tuple[float, float | None]:
    """Milliseconds to copy ``state`` (in host memory) to ``device`` and back on one stream, and (on a GPU) to copy it
    there on one stream while the same bytes come back on another."""
    staged = [torch.empty_like(t, device=device) for t in state]

    def serial() -> None:
        torch._foreach_copy_(staged, state, non_blocking=True)
        torch._foreach_copy_(state, staged, non_blocking=True)

    floor = measure(serial, repeats)
    if device.type != "cuda":
        return floor, None
    sources = [torch.empty_like(t) for t in staged]
    back = [torch.empty_like(t, pin_memory=True) for t in state]
    down, up = torch.cuda.Stream(), torch.cuda.Stream()

    def duplex() -> None:
        start = torch.cuda.current_stream()
        down.wait_stream(start)
        up.wait_stream(start)
        with torch.cuda.stream(down):
            torch._foreach_copy_(staged, state, non_blocking=True)
        with torch.cuda.stream(up):
            torch._foreach_copy_(back, sources, non_blocking=True)
        start.wait_stream(down)
        start.wait_stream(up)

    return floor, measure(duplex, repeats)  # the buffers go with this frame


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--chunks", default="20,22,24", help="log2 of the chunk sizes (elements) to time")
    parser.add_argument("--no-host-arithmetic", action="store_true", help="skip the old, slow host-arithmetic step")
    parser.add_argument("--quick", action="store_true", help="a tiny model on the CPU, to check the script runs")
    args = parser.parse_args(argv)
    cuda = torch.cuda.is_available() and not args.quick
    device = torch.device("cuda" if cuda else "cpu")
    repeats = 2 if args.quick else args.repeats
    if args.quick:
        torch.set_num_threads(1)
    chunk_sizes = [1 << int(c) for c in args.chunks.split(",")] if not args.quick else [64, 1024]
    measure = timer(device)
    model = gpt2_small(args.quick, device)
    name = torch.cuda.get_device_name(device) if cuda else "CPU"
    n = sum(p.numel() for p in model.parameters())
    print(f"{n / 1e6:.1f}M parameters, {name}, torch {torch.__version__}, median of {repeats} calls")
    print(f"default chunk: {DEFAULT_CHUNK_NUMEL} elements\n")
    print("| parameters | what | ms | ratio | extra GPU MiB |\n|---|---|---:|---:|---:|")

    with torch.no_grad():
        for dtype in (torch.float32, torch.bfloat16):
            one_dtype(model, dtype, device, measure, repeats, chunk_sizes, not args.no_host_arithmetic)
            if cuda:
                torch.cuda.empty_cache()


def one_dtype(
    model: torch.nn.Module,
    dtype: torch.dtype,
    device: torch.device,
    measure,
    repeats: int,
    chunk_sizes: list[int],
    host_arithmetic: bool,
) -> None:
    """Print the table rows of the model's parameters in ``dtype`` with float32 state in (pinned) host memory."""
    cuda = device.type == "cuda"
    kind = str(dtype).removeprefix("torch.")
    params = [p.detach().to(dtype, copy=True) for p in model.parameters()]
    slow = [torch.empty(p.shape, dtype=torch.float32, pin_memory=cuda).copy_(p) for p in params]
    momentum = [torch.zeros_like(w) for w in slow]
    moved = 2 * nbytes(slow + momentum)  # every state byte crosses the bus twice
    floor, duplex = transfer_floors(slow + momentum, device, measure, repeats)
    rate = f"1.00x, {moved / floor / 1e6:.1f} GB/s"
    print(f"| {kind} | floor: {moved / 2e9:.2f} GB each way, serial | {floor:.2f} | {rate} | - |")
    if duplex is not None:
        rate = f"{duplex / floor:.2f}x serial, {moved / duplex / 1e6:.1f} GB/s"
        print(f"| {kind} | floor: both ways at once, duplex | {duplex:.2f} | {rate} | - |")
    hyper = dict(lr=0.7, momentum=0.5, nesterov=True)
    for chunk in chunk_sizes:
        offload = HostOffload(chunk)
        if cuda:
            torch.cuda.synchronize()
            before = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
        ms = measure(lambda offload=offload: offload.apply(outer_step, params, slow, momentum, **hyper), repeats)
        extra = f"{(torch.cuda.max_memory_allocated() - before) / 2**20:.0f}" if cuda else "-"
        what = f"streamed outer step, chunk 2^{chunk.bit_length() - 1}"
        print(f"| {kind} | {what} | {ms:.2f} | {ms / floor:.2f}x serial | {extra} |", flush=True)
        offload._staging.clear()
        if cuda:
            torch.cuda.empty_cache()
    if host_arithmetic:
        ms = measure(lambda: outer_step(params, slow, momentum, **hyper), min(repeats, 3))  # slow: few calls
        print(f"| {kind} | host-arithmetic outer step (before) | {ms:.2f} | {ms / floor:.2f}x serial | - |")


if __name__ == "__main__":
    main()
