"""A whole audit on a tiny random Llama with an in-process character tokenizer."""

from __future__ import annotations

import json
import math
import string

import pytest
import torch
from tokenizers import Tokenizer, decoders, models
from transformers import PreTrainedTokenizerFast

from dpft.audit import evaluate_utility, run_audit
from dpft.audit.exposure import canary_exposures
from dpft.audit.scoring import ReferenceScores, encode_record, greedy_generate, token_logprobs
from dpft.data.canaries import make_canaries
from dpft.data.encode import encode_opening
from dpft.errors import DpftError
from dpft.scenarios.medical import UTILITY_FIELDS, medical_audit
from helpers import tiny_llama

CONDITIONS = ["gout", "asthma", "flu", "acne"]


def char_tokenizer() -> PreTrainedTokenizerFast:
    """One token per character; ids 0-3 are pad/bos/eos/unk like tiny_llama's config."""
    vocab = {"<pad>": 0, "<bos>": 1, "<eos>": 2, "<unk>": 3}
    for ch in sorted(set(string.printable[:95]) | set("çéè")):
        vocab[ch] = len(vocab)
    tk = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tk.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=tk, pad_token="<pad>", eos_token="<eos>", bos_token="<bos>", unk_token="<unk>"
    )


def record(first: str, last: str, cond: str, uid: str) -> dict:
    return {
        "prompt": f'{{medical_record: "{first} {last} has {cond}."}}',
        "completion": f'{{last_name: "{last}", condition: "{cond}"}}',
        "user_id": uid,
    }


def canary(cid: str, secret: str, reps: int, kind: str = "exposure", length: int = 6) -> dict:
    return {
        "canary_id": cid,
        "prefix": f"code of {cid} is ",
        "secret": secret,
        "secret_alphabet": "0123456789",
        "secret_length": length,
        "repetitions": reps,
        "included": reps > 0,
        "kind": kind,
        "user_id": f"u-{cid}",
    }


SECRET = canary("c1", "428571", 4)
RECORD = record("Ana", "Lima", "gout", "p1")


@pytest.fixture
def tok() -> PreTrainedTokenizerFast:
    return char_tokenizer()


@pytest.fixture(scope="module")
def memorised():
    """One tiny model fitted to one canary and one record (shared: training is the cost)."""
    texts = [SECRET["prefix"] + SECRET["secret"], RECORD["prompt"] + RECORD["completion"]]
    return memorise(tiny_llama(), char_tokenizer(), texts, steps=120)


def memorise(model, tok, texts: list[str], steps: int):
    """Fit the model to the given token sequences (full loss), the way training would."""
    seqs = [[*encode_opening(tok, t), tok.eos_token_id] for t in texts]
    width = max(map(len, seqs))
    ids = torch.tensor([s + [tok.pad_token_id] * (width - len(s)) for s in seqs])
    mask = (torch.arange(width) < torch.tensor([[len(s)] for s in seqs])).long()
    labels = ids.masked_fill(mask == 0, -100)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    model.train()
    for _ in range(steps):
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def test_left_padded_batch_generation_equals_one_by_one(tok):
    model = tiny_llama()
    prompts = [encode_opening(tok, p) for p in ["ab", "a much longer prompt", "xyz q"]]
    batched = greedy_generate(model, tok, prompts, batch_size=3, max_new_tokens=6)
    single = [greedy_generate(model, tok, [p], batch_size=1, max_new_tokens=6)[0] for p in prompts]
    assert batched == single


def test_right_padded_logprobs_equal_unpadded(tok):
    model = tiny_llama()
    seqs = [encode_record(tok, "p", "short")[0], encode_record(tok, "prompt", "much longer")[0]]
    batched = token_logprobs(model, seqs, batch_size=2)
    for seq, lp in zip(seqs, batched, strict=True):
        alone = token_logprobs(model, [seq], batch_size=1)[0]
        assert len(lp) == len(seq) - 1
        assert torch.allclose(torch.tensor(lp), torch.tensor(alone), atol=1e-4)


def test_memorised_canary_gains_exposure(tok, memorised):
    before = canary_exposures(tiny_llama(), tok, [SECRET], num_candidates=200)
    after = canary_exposures(memorised, tok, [SECRET], num_candidates=200)
    e0, e1 = before["per_canary"][0]["exposure"], after["per_canary"][0]["exposure"]
    assert e1 > e0 + 5 and e1 > 10
    assert after["method"] == "skewnorm" and after["max_exposure"] == pytest.approx(math.log2(1e6))


def test_small_secret_space_uses_exact_rank(tok):
    out = canary_exposures(tiny_llama(), tok, [canary("c2", "07", 0, length=2)], num_candidates=500)
    assert out["method"] == "exact"
    assert 0 <= out["per_canary"][0]["exposure"] <= math.log2(100)


def test_utility_of_a_model_that_memorised_its_record(tok, memorised):
    out = evaluate_utility(memorised, tok, [RECORD], fields=UTILITY_FIELDS, max_new_tokens=48)
    assert out["exact_match"] == {"last_name": 1.0, "condition": 1.0, "full": 1.0}
    assert out["valid_format"] == 1.0 and out["fields"] == ["last_name", "condition"]
    assert out["loss"] < 0.1 and out["perplexity"] == pytest.approx(math.exp(out["loss"]))
    untrained = evaluate_utility(tiny_llama(), tok, [RECORD], fields=UTILITY_FIELDS, max_new_tokens=8)
    assert untrained["valid_format"] == 0.0 and untrained["loss"] > 3


def test_utility_per_record_matches_are_the_means_parts(tok, memorised):
    """per_record: one bool per answered record, in order; the exact match is their mean."""
    other = record("Bo", "Chen", "asthma", "p2")  # never trained on: the model answers Ana Lima's
    out = evaluate_utility(memorised, tok, [RECORD, other], fields=UTILITY_FIELDS, max_new_tokens=48, per_record=True)
    assert out["per_record"]["full"] == [True, False] and out["per_record"]["last_name"] == [True, False]
    for name, values in out["per_record"].items():
        assert out["exact_match"][name] == sum(values) / len(values)
    assert "per_record" not in evaluate_utility(memorised, tok, [RECORD], max_new_tokens=48)


def audit_inputs() -> tuple[list[dict], list[dict], list[dict]]:
    """Members (Dupont thrice, four patients, a text record), four non-members, ten canaries."""
    names = [
        ("Ana", "Lima"),
        ("Bo", "Chen"),
        ("Cy", "Diaz"),
        ("Di", "Eko"),
        ("Ed", "Fox"),
        ("Fa", "Gil"),
        ("Gu", "Ho"),
        ("Hu", "Ito"),
    ]
    members = [record("François", "Dupont", "acne", "p0")] * 3
    members += [record(f, la, CONDITIONS[i % 4], f"p{i + 1}") for i, (f, la) in enumerate(names[:4])]
    members.append({"text": "code of x is 123456", "user_id": "u-x"})
    non_members = [record(f, la, CONDITIONS[i % 4], f"h{i}") for i, (f, la) in enumerate(names[4:])]
    canaries = [canary("e0", "111111", 0), canary("e1", "222222", 2)]
    canaries += [canary(f"o{i}", f"{i:06d}", i % 2, kind="one_run") for i in range(8)]
    return members, non_members, canaries


def test_run_audit_keys_and_ranges(tok):
    members, non_members, canaries = audit_inputs()
    model = tiny_llama()
    out = run_audit(
        model,
        tok,
        members,
        non_members,
        canaries,
        reference_model=tiny_llama(seed=1),
        batch_size=4,
        max_new_tokens=8,
        num_candidates=100,
        n_boot=20,
        theoretical_epsilon=8.0,
        delta=1e-5,
    )
    medical = medical_audit(model, tok, members, non_members, CONDITIONS, batch_size=4, max_new_tokens=8, n_boot=20)
    json.dumps(out | {"medical": medical}, allow_nan=False)
    assert out["settings"]["members_scored"] == 8 and medical["non_member_patients"] == 4
    assert out["verbatim"]["members"] == 8 and 0 <= out["verbatim"]["lcs"]["member"] <= 1 and out["secrets"] is None
    ext = medical["extraction"]
    assert ext["members"] == 5 and set(ext["by_repetition"]) == {"1", "3"}
    assert 0 <= ext["member_rate"] <= 1 and -1 <= ext["advantage"] <= 1
    assert 1 <= ext["rank"]["member_mean_rank"] <= 4
    assert set(out["mia"]) == {"loss", "zlib", "min_k", "reference"}
    assert all(0 <= m["auc"] <= 1 for m in out["mia"].values())
    assert set(out["exposure"]["by_repetition"]) == {"0", "2"}
    assert all(0 <= c["exposure"] <= math.log2(1e6) for c in out["exposure"]["per_canary"])
    one_run = out["one_run"]
    assert one_run["canaries"] == 8 and one_run["m"] == 6 and one_run["calibration"]["canaries"] == 2
    assert one_run["calibration"]["source"] == "drawn by the audit (--seed)"  # these canaries carry no role
    assert one_run["scores"] == ["reference", "loss", "zlib", "alternatives"] and one_run["score"] in one_run["scores"]
    assert one_run["epsilon_lower_bound"] >= 0 and one_run["theoretical_epsilon"] == 8.0
    assert one_run["fraction_of_guarantee"] == one_run["epsilon_lower_bound"] / 8.0
    assert out["theoretical_epsilon"] == 8.0 and isinstance(medical["dupont_completion"], str)


def test_shared_reference_scores_run_the_base_once_and_change_nothing(tok):
    """The demo audits two models against one base: its scores are computed for the first only."""
    members, non_members, canaries = audit_inputs()
    base = tiny_llama(seed=1)
    calls = []
    base.register_forward_hook(lambda *_: calls.append(1))
    shared = ReferenceScores(base)
    kwargs = dict(batch_size=4, max_new_tokens=8, num_candidates=50, n_boot=20, delta=1e-5)
    audits = []
    for seed in (2, 3):  # two different audited models
        model = tiny_llama(seed=seed)
        plain = run_audit(model, tok, members, non_members, canaries, reference_model=base, **kwargs)
        before = len(calls)
        cached = run_audit(model, tok, members, non_members, canaries, reference_model=shared, **kwargs)
        audits.append(len(calls) - before)
        assert cached == plain
    assert audits[0] > 0 and audits[1] == 0
    medical = medical_audit(model, tok, members, non_members, CONDITIONS, max_new_tokens=4, rank_conditions=False)
    assert medical["extraction"]["rank"] is None


@pytest.mark.parametrize("design", ["rare-prefix", "name-digits"])
def test_memorised_one_run_canaries_refute_a_small_epsilon(tmp_path, tok, design, one_torch_thread):
    """Canaries of the generator, the included ones fitted: the audit's one test finds them (and the base model does not)."""
    like = tmp_path / "like.jsonl"
    like.write_text(json.dumps({"text": "a record"}) + "\n")
    make_canaries(
        str(like), str(tmp_path / "c"), seed=4, canaries_per_repetition=0, one_run_canaries=60, canary_design=design
    )
    canaries = [json.loads(line) for line in (tmp_path / "c" / "canaries.jsonl").read_text().splitlines()]
    # 300 steps: at 150, fp32 rounding alone (AVX2 vs AVX-512 kernels) decided whether 16 or 18 of 18 guesses were right
    fitted = memorise(tiny_llama(), tok, [c["record"]["text"] for c in canaries if c["included"]], steps=300)
    members, non_members = [{"text": "member record"}], [{"text": "other record"}]
    kwargs = dict(batch_size=32, verbatim=False, n_boot=10, num_candidates=20, one_run_alternatives=4)
    out = run_audit(fitted, tok, members, non_members, canaries, reference_model=tiny_llama(), **kwargs)["one_run"]
    assert out["canaries"] == 60 and out["m"] == 45 and out["calibration"]["source"] == "canaries (role)"
    assert out["calibration"]["chosen_by"] == "calibration" and out["k_minus"] == 0  # one-sided evidence
    assert out["correct"] == out["guesses"] > 5 and out["epsilon_lower_bound"] > 0.5
    base = run_audit(tiny_llama(), tok, members, non_members, canaries, reference_model=tiny_llama(), **kwargs)
    assert base["one_run"]["epsilon_lower_bound"] == 0.0


def test_run_audit_refuses_without_non_members(tok):
    with pytest.raises(DpftError):
        run_audit(tiny_llama(), tok, [record("A", "B", "flu", "p")], [], None)
    with pytest.raises(DpftError, match="medical"):
        medical_audit(tiny_llama(), tok, [record("A", "B", "flu", "p")], [{"text": "not medical"}])


def test_max_records_caps_scoring_but_keeps_dupont(tok):
    members = [record("François", "Dupont", "acne", "p0")]
    members += [record("Al", f"N{i}", "flu", f"p{i + 1}") for i in range(5)]
    non_members = [record("Bo", f"H{i}", "gout", f"h{i}") for i in range(5)]
    out = run_audit(tiny_llama(), tok, members, non_members, None, max_records=2, max_new_tokens=4, n_boot=10)
    assert out["settings"]["members_scored"] == 2 and out["verbatim"]["non_members"] == 2
    assert out["exposure"] is None and out["one_run"] is None
    medical = medical_audit(tiny_llama(), tok, members, non_members, max_records=2, max_new_tokens=4, n_boot=10)
    assert medical["member_patients"] == 2 and medical["extraction"]["non_members"] == 2
    assert medical["dupont_completion"] is not None and medical["extraction"]["rank"]["num_conditions"] == 3


def test_shared_head_scoring_equals_full_sequences():
    """The KV-cached candidate scorer must give exactly the full-sequence log-probabilities."""
    from dpft.audit.scoring import continuation_logprob, shared_head_logprobs
    from helpers import tiny_llama

    model = tiny_llama()
    head = [5, 9, 17, 33, 2, 40]
    tails = [[7], [8, 9, 10], [11, 12], [3, 3, 3, 3, 3]]
    cached = shared_head_logprobs(model, head, tails, batch_size=3)
    full = continuation_logprob(model, [head] * len(tails), tails, batch_size=2)
    assert cached == pytest.approx(full, rel=1e-4, abs=1e-4)


def test_single_suffix_items_score_like_shared_head_items(tok):
    """Single-suffix items are batched as whole sequences; they must score as the cached path does."""
    from dpft.audit.scoring import suffix_logprobs

    model = tiny_llama()
    contexts = ["the id is ", "a longer context whose id is ", "x "]
    singles = suffix_logprobs(model, tok, [(c, ["123"]) for c in contexts], batch_size=2)
    pairs = suffix_logprobs(model, tok, [(c, ["123", "9"]) for c in contexts], batch_size=2)
    assert [s[0] for s in singles] == pytest.approx([p[0] for p in pairs], rel=1e-4, abs=1e-4)
    assert suffix_logprobs(model, tok, [("x ", [])])[0].size == 0
