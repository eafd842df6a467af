"""ssmc.integrations.transformers: a patched Hugging Face Mamba2 / Mamba model against the same
model unpatched (transformers' own PyTorch mixers), on tiny random fp32 configurations:
logits, gradients, greedy generation through the cache, torch.compile, and the refusals.

The ops run on `backend="auto"`, which is TVM's LLVM target on a CPU. Every call has the same
batch and length, so the kernels built by the first test serve the others."""
import copy

import pytest
import torch

transformers = pytest.importorskip("transformers")

from ssmc.errors import ArgumentError, UnsupportedError  # noqa: E402
from ssmc.integrations.transformers import is_patched, patch, unpatch  # noqa: E402

VOCAB = 61
KINDS = ("mamba2", "mamba")
B, T = 2, 24  # batch and prompt length of every call


def tiny(kind: str, seed: int = 0):
    """A randomly initialised 2-layer model, hidden 64, in eval mode. Mamba2: 8 heads of 16
    in 2 groups, state 16, chunk 16 (the prompts below span several chunks); Mamba: d 128,
    state 8."""
    torch.manual_seed(seed)
    if kind == "mamba2":
        config = transformers.Mamba2Config(
            vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_heads=8, head_dim=16,
            state_size=16, n_groups=2, expand=2, chunk_size=16, conv_kernel=4)
        model = transformers.Mamba2ForCausalLM(config)
    else:
        config = transformers.MambaConfig(
            vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, state_size=8, expand=2,
            conv_kernel=4, time_step_rank=8,
            use_associative_scan=False)  # its sequential loop is the faster one at t=24
        model = transformers.MambaForCausalLM(config)
    with torch.no_grad():  # D and dt away from their constant inits, so each term shows
        for name, p in model.named_parameters():
            if name.endswith(("mixer.D", "dt_bias", "dt_proj.bias")):
                p.add_(0.3 * torch.randn_like(p))
    return model.eval()


def pair(kind: str):
    """(unpatched, patched) copies of one model."""
    ref = tiny(kind)
    return ref, patch(copy.deepcopy(ref))


def ids(seed: int) -> torch.Tensor:
    return torch.randint(0, VOCAB, (B, T), generator=torch.Generator().manual_seed(seed))


def cache_of(output):
    """(keyword, cache) of a forward's output: releases name it `cache` or `cache_params`."""
    name = "cache" if "cache" in output else "cache_params"
    return name, output[name]


def decode_kwargs(name, cache, step: int) -> dict:
    """The keywords of decode step `step` after a prompt of T tokens."""
    kw = {name: cache, "use_cache": True}
    if hasattr(cache, "ssm_states"):  # Mamba2Cache, MambaCache (4.x, 5.0) take positions
        kw["cache_position"] = torch.tensor([T + step])
    return kw


def close(a, b, what, atol=2e-5, rtol=1e-4):
    err = (a - b).abs().max().item()
    assert torch.allclose(a, b, atol=atol, rtol=rtol), f"{what}: max abs error {err:.3g}"


@pytest.mark.parametrize("kind", KINDS)
def test_logits_match(kind):
    ref, model = pair(kind)
    x = ids(1)
    mask = torch.ones_like(x)
    mask[1, :5] = 0  # a left-padded row
    with torch.no_grad():
        close(model(x).logits, ref(x).logits, "logits")
        close(model(x, attention_mask=mask).logits, ref(x, attention_mask=mask).logits,
              "logits with a padding mask")


def rel_rms(a, b) -> float:
    a, b = a.double(), b.double()
    return ((a - b).pow(2).mean().sqrt() / b.pow(2).mean().sqrt()).item()


@pytest.mark.parametrize("kind", KINDS)
def test_bf16_error_is_transformers_own(kind):
    """In bf16 the patched model is as far from the fp32 model as the unpatched one is (bf16
    rounding, ~1e-2 here): a bf16-only mismatch (a parameter read or cast differently in low
    precision) would show as a larger error. benchmarks/transformers_patch.py reports the
    same comparison on the GPU."""
    ref = tiny(kind)
    x = ids(9)
    with torch.no_grad():
        want = ref(x).logits
        plain = copy.deepcopy(ref).bfloat16()(x).logits
        patched = patch(copy.deepcopy(ref).bfloat16())(x).logits
    err, own = rel_rms(patched, want), rel_rms(plain, want)
    assert 1e-4 < own < 5e-2, f"unpatched bf16 error {own:.3g}: not bf16 rounding"
    assert err < 1.5 * own, f"patched bf16 error {err:.3g}, transformers' own {own:.3g}"


@pytest.mark.parametrize("kind", KINDS)
def test_gradients_match(kind):
    ref, model = pair(kind)
    ref.train(), model.train()
    x = ids(2)
    losses = [m(x, labels=x).loss for m in (ref, model)]
    for loss in losses:
        loss.backward()
    close(losses[1], losses[0], "loss")
    for (name, p_ref), p in zip(ref.named_parameters(), model.parameters()):
        if p_ref.grad is None:
            assert p.grad is None, name
            continue
        close(p.grad, p_ref.grad, f"grad of {name}", atol=1e-5 * p_ref.grad.abs().max())


@pytest.mark.parametrize("kind", KINDS)
def test_generate_matches(kind):
    """Greedy decoding: the prefill fills the cache, each new token is one decode step."""
    ref, model = pair(kind)
    x = ids(3)
    kw = dict(max_new_tokens=6, do_sample=False, return_dict_in_generate=True,
              output_scores=True, pad_token_id=0)
    with torch.no_grad():
        want, got = ref.generate(x, **kw), model.generate(x, **kw)
    assert torch.equal(got.sequences, want.sequences)
    for step, (a, b) in enumerate(zip(got.scores, want.scores)):
        close(a, b, f"scores of new token {step}")


def test_cache_continues_across_patch():
    """A cache filled by the unpatched model continues under the patched one: same layout."""
    model = tiny("mamba2")
    with torch.no_grad():
        prefill = model(ids(4), use_cache=True)
        name, cache = cache_of(prefill)
        token = prefill.logits[:, -1:].argmax(-1)
        twin = copy.deepcopy(cache)
        want = model(token, **decode_kwargs(name, cache, 0)).logits
        got = patch(model)(token, **decode_kwargs(name, twin, 0)).logits
    close(got, want, "logits of the next token")


def test_torch_compile_training():
    """Forward and backward through the op under torch.compile. Mamba only in the decode
    test below: a compiled backward is the same custom-op mechanism for every definition
    (tests/torch), and Mamba's is slow to trace here."""
    ref, model = pair("mamba2")
    ref.train(), model.train()
    x = ids(5)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    losses = [compiled(x, labels=x).loss, ref(x, labels=x).loss]
    for loss in losses:
        loss.backward()
    close(losses[0], losses[1], "loss")
    grad = ref.lm_head.weight.grad
    close(model.lm_head.weight.grad, grad, "lm_head grad", atol=1e-5 * grad.abs().max())


@pytest.mark.parametrize("kind", KINDS)
def test_torch_compile_decode(kind):
    """Decode steps of a compiled model continue an eager prefill's cache."""
    ref, model = pair(kind)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        prefill = ref(ids(6), use_cache=True)
        name, cache = cache_of(prefill)
        token = prefill.logits[:, -1:].argmax(-1)
        caches = {m: copy.deepcopy(cache) for m in (ref, compiled)}
        for step in range(2):
            got, want = (m(token, **decode_kwargs(name, caches[m], step)).logits
                         for m in (compiled, ref))
            close(got, want, f"logits of decode step {step}")
            token = want[:, -1:].argmax(-1)


def test_unpatch_restores():
    ref, model = pair("mamba2")
    mixer = model.backbone.layers[0].mixer
    assert is_patched(model) and type(mixer).__name__ == "SSMCMamba2Mixer"
    assert model.state_dict().keys() == ref.state_dict().keys()
    assert unpatch(model) is model and not is_patched(model)
    assert type(mixer) is type(ref.backbone.layers[0].mixer)
    assert not hasattr(mixer, "_ssmc_op_key")
    assert patch(patch(model)) is model  # patching twice is patching once


def test_refuses_a_cache_that_records_intermediate_states():
    """Assisted decoding asks linear-attention caches for the state after each new token."""
    model = tiny("mamba2")
    with torch.no_grad():
        prefill = model(ids(7), use_cache=True)
        name, cache = cache_of(prefill)
        if not hasattr(cache, "get_recurrent_states_to_keep"):
            pytest.skip("this transformers release has no recording caches")
        cache.activate_past_recording(recurrent_states_to_keep=2)
        with pytest.raises(UnsupportedError, match="after each new token"):
            patch(model)(ids(8), **decode_kwargs(name, cache, 0))


def test_refuses_models_without_mamba_mixers():
    config = transformers.FalconMambaConfig(vocab_size=VOCAB, hidden_size=32, state_size=4,
                                            num_hidden_layers=1)
    falcon = transformers.FalconMambaForCausalLM(config)
    with pytest.raises(UnsupportedError, match="FalconMambaMixer"):
        patch(falcon)
    with pytest.raises(UnsupportedError, match="has no transformers Mamba2Mixer"):
        patch(torch.nn.Linear(2, 2))
    with pytest.raises(ArgumentError, match="must be a torch.nn.Module"):
        patch("state-spaces/mamba2-130m")
