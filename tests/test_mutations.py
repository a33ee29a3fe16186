"""Break the privacy code on purpose and check that a test fails (an adversarial check of the suite).

Each mutation replaces one exact snippet of `src/` in a temporary copy of the package and runs the
tests that claim to catch it; they must fail. A snippet that no longer exists fails this test
too, so a refactor cannot silently retire a check.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Mutation:
    name: str
    file: str
    old: str
    new: str
    tests: tuple[str, ...]


MUTATIONS = [
    Mutation(
        "noise std σ instead of σC",
        "privacy/step.py",
        "return self.mechanism.noise_multiplier * self.mechanism.max_grad_norm",
        "return self.mechanism.noise_multiplier",
        (
            "tests/test_step.py::test_empty_step_is_noised_with_std_sigma_c_over_expected_batch",
            "tests/test_fsdp.py::test_noise_is_added_once_per_coordinate",
        ),
    ),
    Mutation(
        "division by the realised batch size",
        "privacy/step.py",
        "param.grad = total.div_(m.expected_batch_size)",
        "param.grad = total.div_(max(1, getattr(self, '_seen', 0)))",
        ("tests/test_step.py::test_divides_by_the_expected_batch_not_the_realised_one",),
    ),
    Mutation(
        "noise once per micro-batch",
        "privacy/step.py",
        "        return self._engine.backward(example_losses, unit_index)",
        "        norms = self._engine.backward(example_losses, unit_index)\n"
        "        add_gaussian_noise(list(self._engine._sums.values()), "
        "self.mechanism.noise_multiplier * self.mechanism.max_grad_norm, self._randomness, self._step)\n"
        "        return norms",
        ("tests/test_step.py::test_noise_is_added_once_per_step_not_per_micro_batch",),
    ),
    Mutation(
        "empty steps skipped",
        "privacy/step.py",
        "if m.dp and (self._reducer is None or self._reducer.adds_noise):",
        "if m.dp and (self._reducer is None or self._reducer.adds_noise) and any(s.any() for s in sums.values()):",
        ("tests/test_step.py::test_empty_step_is_noised_with_std_sigma_c_over_expected_batch",),
    ),
    Mutation(
        "bf16 rounding before the noise",
        "privacy/step.py",
        "        sums = self._engine.take_sums()\n",
        "        sums = {n: s.to(self._params[n].dtype).float() for n, s in self._engine.take_sums().items()}\n",
        ("tests/test_step.py::test_bf16_weights_one_more_unit_moves_the_pre_noise_sum_by_at_most_c",),
    ),
    Mutation(
        "hard stop assumes every journalled step used the current (q, σ)",
        "privacy/step.py",
        "segments = [*self._journal.segments(), self.mechanism.segment]",
        "segments = [self.mechanism.segment._replace(steps=sum(s.steps for s in self._journal.segments()) + 1)]",
        ("tests/test_step.py::test_hard_stop_composes_the_journals_actual_segments",),
    ),
    Mutation(
        "optimizer applies a gradient the step did not write (a module replaced after attach)",
        "privacy/step.py",
        "        self._refuse_unknown_params(optimizer)\n",
        "",
        ("tests/test_step.py::test_a_parameter_the_step_did_not_write_is_not_updated",),
    ),
    Mutation(
        "stray gradients looked for on the attach-time parameters only",
        "privacy/engine.py",
        "        current = _trainable(self._model)\n",
        "        current = dict(self._params)\n",
        ("tests/test_engine.py::test_a_module_replaced_after_attach_is_refused",),
    ),
    Mutation(
        "hard stop ignores --dataset-budget (steps redone after a crash pass it)",
        "privacy/step.py",
        "if b.dataset is not None and b.dataset.epsilon(segments, b.delta, b.accountant) > b.dataset.limit:",
        "if False:",
        ("tests/test_resume_ledger.py::test_steps_redone_after_crashes_stop_at_the_dataset_budget",),
    ),
    Mutation(
        "resume keeps the planned spend in the ledger (fewer steps than the journal)",
        "training/budget.py",
        "        record([*spent, left])\n",
        "        pass\n",
        ("tests/test_resume_ledger.py::test_steps_redone_after_crashes_stop_at_the_dataset_budget",),
    ),
    Mutation(
        "resume finishes a run whose journal is already over --dataset-budget",
        "privacy/accounting.py",
        "        if spent > self.limit:\n",
        "        if False:\n",
        ("tests/test_resume_ledger.py::test_resume_refuses_a_journal_already_over_the_dataset_budget",),
    ),
    Mutation(
        "resume accepts a journal shorter than the checkpoint",
        "training/journal.py",
        "    if steps < checkpoint_step:\n",
        "    if False:\n",
        (
            "tests/test_resume_ledger.py::test_resume_refuses_a_journal_shorter_than_the_checkpoint",
            "tests/test_hf_resume.py::test_resume_refuses_a_journal_shorter_than_the_checkpoint",
        ),
    ),
    Mutation(
        "δ accepted up to 1/N",
        "privacy/accounting.py",
        "delta * num_units > MAX_DELTA_TIMES_N * (1 + 1e-9)",
        "delta * num_units >= 1",
        ("tests/test_accounting.py::test_check_delta_refuses_more_than_a_tenth_of_one_over_n",),
    ),
    Mutation(
        "record- and user-level runs composed into one total",
        "ledger.py",
        "if e.privacy_unit is not None and e.privacy_unit != privacy_unit:",
        "if False:",
        ("tests/test_ledger.py::test_a_run_of_another_privacy_unit_is_refused_under_a_dataset_budget",),
    ),
    Mutation(
        "sampler seeded from the config",
        "training/recipe.py",
        "randomness = Randomness.secure() if seed is None else Randomness.unsafe_seeded(seed)",
        "randomness = Randomness.unsafe_seeded(config.seed if seed is None else seed)",
        ("tests/test_randomness.py::test_two_secure_runs_draw_different_batches_and_noise",),
    ),
    Mutation(
        "resume with changed data",
        "training/recipe.py",
        '    if state.get("data") != sha256_file(saved.data):',
        "    if False:",
        ("tests/test_resume_checks.py::test_resume_refuses_changed_data",),
    ),
    Mutation(
        "one shared stream for every user's cap",
        "privacy/sampling.py",
        'randomness.numpy("cap", unit_id)',
        'randomness.numpy("cap", 0)',
        ("tests/test_randomness.py::test_a_users_capped_records_do_not_depend_on_other_users",),
    ),
    Mutation(
        "per-example gradients in bf16",
        "privacy/rules/linear.py",
        'torch.einsum("bto,bti->boi", g.float(), a.float())',
        'torch.einsum("bto,bti->boi", g.bfloat16(), a.bfloat16()).float()',
        ("tests/test_engine_precision.py::test_linear_1x1_rounding_adversary",),
    ),
    Mutation(
        "a Gram reused across layers (found by memory address)",
        "privacy/rules/base.py",
        "self.memo[0][0] is source",
        "self.memo[0][0].data_ptr() == source.data_ptr()",
        ("tests/test_engine_gram.py::test_gram_of_another_tensor_at_the_same_address_is_recomputed",),
    ),
    Mutation(
        "modules that mix examples accepted",
        "privacy/layers.py",
        "def mixes_examples(module: nn.Module) -> str | None:\n",
        "def mixes_examples(module: nn.Module) -> str | None:\n    return None\n",
        ("tests/test_engine_mixing.py::test_batch_statistics_are_refused_at_attach",),
    ),
    Mutation(
        "Trainer resume with changed data",
        "hf/resume.py",
        '    if state.get("data") != fingerprint:',
        "    if False:",
        ("tests/test_hf_resume.py::test_resume_refuses_changed_data_and_other_targets",),
    ),
    Mutation(
        "Trainer resume forgets the interrupted step",
        "hf/trainer.py",
        "        dp.par.barrier()  # every rank has read the checkpoint before rank 0 trims the logs\n",
        "        dp.par.barrier()\n        truncate_rows(dp.paths.journal, dp.steps_done)\n",
        ("tests/test_hf_resume.py::test_resume_accounts_the_interrupted_step_and_continues_the_run",),
    ),
    Mutation(
        "Trainer resume restarts the step count",
        "hf/trainer.py",
        "        self.state.global_step = self._dp.steps_done\n",
        "",
        ("tests/test_hf_resume.py::test_resume_accounts_the_interrupted_step_and_continues_the_run",),
    ),
    Mutation(
        "Trainer wraps the model in DDP (several processes)",
        "hf/trainer.py",
        "        if not self._dp.par.distributed:\n            return super()._prepare_for_training(",
        "        if True:\n            return super()._prepare_for_training(",
        ("tests/test_hf_distributed.py::test_two_processes_equal_one",),
    ),
    Mutation(
        "Trainer accepts fp8 / fp16 from accelerate's environment",
        "hf/trainer.py",
        '    if any(mode not in ("no", "bf16") for mode in modes):',
        "    if False:",
        ("tests/test_hf_trainer.py::test_accelerates_mixed_precision_from_the_environment_is_refused",),
    ),
    Mutation(
        "Trainer accepts NEFTune",
        "hf/trainer.py",
        '        if getattr(args, "neftune_noise_alpha", None) is not None:',
        "        if False:",
        (
            "tests/test_hf_trainer.py::test_unsafe_settings_are_refused",
            "tests/test_hf_trainer.py::test_packing_and_neftune_are_refused_for_sft",
        ),
    ),
    Mutation(
        "Trainer skips the model probe",
        "hf/trainer.py",
        "        check_trainable(self.model, len(self.processing_class))",
        "        pass",
        ("tests/test_hf_trainer.py::test_a_model_the_engine_cannot_clip_is_refused_before_the_ledger_and_the_run",),
    ),
    Mutation(
        "Trainer accepts a RoPE that follows the batch (dynamic, longrope)",
        "hf/trainer.py",
        '        check_rope(getattr(self.model, "config", None), length)',
        "        pass",
        ("tests/test_rope.py::test_dp_trainer_refuses_it_before_anything_is_written",),
    ),
    Mutation(
        "recipe accepts a RoPE that follows the batch (dynamic, longrope)",
        "training/recipe.py",
        "        check_rope(loaded.model.config, config.max_length)",
        "        pass",
        ("tests/test_rope.py::test_dpft_train_refuses_it_before_anything_is_written",),
    ),
    Mutation(
        "each rank keeps its own draw of a user's capped records",
        "training/distributed.py",
        "        units.adopt(self.from_main(units.unit_examples))\n",
        "",
        ("tests/test_distributed.py::test_every_rank_keeps_rank_0s_choice_of_each_users_records",),
    ),
    Mutation(
        "noise added on every rank (data parallel)",
        "privacy/step.py",
        "if m.dp and (self._reducer is None or self._reducer.adds_noise):",
        "if m.dp:",
        ("tests/test_distributed.py::test_noise_is_added_once_not_on_every_rank",),
    ),
    Mutation(
        "FSDP: each rank noises its rows after every micro-batch, not once at the step's end",
        "privacy/step.py",
        "        return self._engine.backward(example_losses, unit_index)",
        "        norms = self._engine.backward(example_losses, unit_index)\n"
        "        rows = getattr(self._reducer, '_rows', {})\n"
        "        shards = dict(zip(getattr(self._reducer, 'names', []), getattr(self._reducer, 'shards', [])))\n"
        "        add_gaussian_noise(list(rows.values()), self._noise_std, self._randomness, self._step, "
        "[shards[n] for n in rows])\n"
        "        return norms",
        ("tests/test_fsdp.py::test_micro_batches_sharded_equal_the_per_unit_loop_and_one_process",),
    ),
    Mutation(
        "FSDP: the engine hands the sums over at the micro-batch's end (the whole model in full shape)",
        "privacy/engine.py",
        "                    if left[key] == 0:\n",
        "                    if False:\n",
        ("tests/test_fsdp.py::test_no_full_shape_sum_outlives_its_micro_batch",),
    ),
    Mutation(
        "FSDP: the clipped sums are not summed over the ranks (each rank keeps its own rows)",
        "privacy/sharded.py",
        "dist.reduce_scatter_tensor(received, send.reshape(-1), op=dist.ReduceOp.SUM, group=self.group)",
        "received.copy_(send[self.rank])",
        ("tests/test_fsdp.py::test_sharded_clipped_sums_equal_the_per_unit_loop",),
    ),
    Mutation(
        "FSDP: the norm rule clips against the attach-time (sharded) weights",
        "privacy/rules/norm.py",
        "current = {n: module._parameters[n] for n in params}",
        "current = params",
        ("tests/test_fsdp.py::test_sharded_clipped_sums_equal_the_per_unit_loop",),
    ),
    Mutation(
        "one-run: score and split chosen on the audited canaries",
        "audit/one_run.py",
        "predicted_epsilon(s[cal], truth[cal], split, m, delta)",
        "predicted_epsilon(s[~cal], truth[~cal], split, m, delta)",
        ("tests/test_audit_metrics.py::test_the_choice_never_sees_the_audited_canaries",),
    ),
    Mutation(
        "recipe: noise per micro-batch (finish inside the micro-batch loop)",
        "training/recipe.py",
        "        log.add(per_example, run.step.backward(per_example, unit_index))\n"
        "    for _ in range(run.par.idle_passes([len(b) for b in batches])):  # --fsdp: ranks pass in lockstep\n"
        "        _idle_pass(run)\n"
        "    run.step.finish()",
        "        log.add(per_example, run.step.backward(per_example, unit_index))\n"
        "        run.step.finish()\n"
        "    for _ in range(run.par.idle_passes([len(b) for b in batches])):  # --fsdp: ranks pass in lockstep\n"
        "        _idle_pass(run)\n"
        "    pass",
        ("tests/test_train_e2e.py::test_dp_run_writes_the_contract",),
    ),
    Mutation(
        "the step's loss in the public metrics row",
        "training/step_log.py",
        'append_row(paths.metrics, {"step": step, "epsilon": epsilon, "lr": lr})',
        'append_row(paths.metrics, {"step": step, "epsilon": epsilon, "lr": lr, "loss": loss})',
        ("tests/test_resume_checks.py::test_shipped_files_hold_no_private_numbers",),
    ),
    Mutation(
        "privacy.json carries the last step's loss",
        "training/recipe.py",
        "    report = privacy_report(run, stop_reason)\n",
        "    report = privacy_report(run, stop_reason)\n"
        '    report["final_loss"] = json.loads(run.paths.train_log.read_text().splitlines()[-1])["loss"]\n',
        ("tests/test_resume_checks.py::test_shipped_files_hold_no_private_numbers",),
    ),
    Mutation(
        "DP-AdamBC: φ = σC, not divided by the expected batch",
        "training/optimizer.py",
        "mechanism.noise_multiplier * mechanism.max_grad_norm / mechanism.expected_batch_size",
        "mechanism.noise_multiplier * mechanism.max_grad_norm",
        ("tests/test_optimizer.py::test_phi_is_sigma_c_over_expected_batch",),
    ),
    Mutation(
        "one-run: m counts every canary, calibration ones included",
        "audit/one_run.py",
        "    m = int(audited.sum())\n",
        "    m = len(truth)\n",
        ("tests/test_audit_metrics.py::test_m_counts_the_audited_canaries_only",),
    ),
    Mutation(
        "one-run: the best split on the audited canaries, without correction",
        "audit/one_run.py",
        "    bound = epsilon_lower_bound(m, k_plus + k_minus, correct, delta)\n",
        "    bound = max(epsilon_lower_bound(m, sum(guesses(m, sp)), count_correct(table[name][audited], "
        "truth[audited], *guesses(m, sp)), delta) for sp in SPLITS)\n",
        ("tests/test_audit_metrics.py::test_random_scores_refute_nothing",),
    ),
]


def _mutated_copy(tmp_path: Path, m: Mutation) -> Path:
    src = tmp_path / "src"
    shutil.copytree(ROOT / "src", src, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    target = src / "dpft" / m.file
    text = target.read_text()
    assert text.count(m.old) == 1, f"{m.file}: the snippet of '{m.name}' is gone; update the mutation"
    target.write_text(text.replace(m.old, m.new))
    return src


@pytest.mark.slow
@pytest.mark.parametrize("m", MUTATIONS, ids=[m.name for m in MUTATIONS])
def test_mutation_is_caught(tmp_path: Path, m: Mutation) -> None:
    src = _mutated_copy(tmp_path, m)
    env = {**os.environ, "PYTHONPATH": str(src)}
    cmd = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", "-m", "slow or not slow", *m.tests]
    result = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 1, f"'{m.name}' was not caught:\n{result.stdout[-2000:]}"


@pytest.mark.slow
def test_the_mutated_copy_is_what_runs(tmp_path: Path) -> None:
    src = _mutated_copy(tmp_path, MUTATIONS[0])
    env = {**os.environ, "PYTHONPATH": str(src)}
    out = subprocess.run(
        [sys.executable, "-c", "import dpft; print(dpft.__file__)"], env=env, capture_output=True, text=True
    )
    assert out.stdout.strip().startswith(str(src))
