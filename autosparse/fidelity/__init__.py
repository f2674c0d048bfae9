"""The fidelity objective: how closely a sparse model follows the dense model's own output.

For every document the dense model's greedy continuation of the task prompt is
generated once and stored (a *reference*: up to ``max_new_tokens`` tokens, ending at
the first end-of-sequence token, which is suppressed until ``min_new_tokens`` exist).
A trial then scores the sparse model on each reference in one teacher-forced forward
pass over prompt + continuation, with the engine's continuation-scoring path: the
prompt runs dense and selects the core neurons, every continuation position runs
sparse. No generation happens in a trial.

Per document:

- ``fidelity``: the mean log-likelihood (nats per token) the sparse model gives the
  dense continuation. Higher is better; the dense model's own value is the ceiling
  in practice. The first continuation token is predicted by the last prompt
  position, which runs dense (as the first generated token does in real decoding),
  so it contributes the same value under every method.
- ``kl``: the mean over continuation positions of KL(dense || sparse) between the
  next-token distributions, in nats. Lower is better. Full dense distributions are
  too large to store (vocabulary x tokens x documents), so the reference keeps the
  dense model's ``top_k`` log-probabilities per position, and the KL is taken
  between the two distributions coarse-grained to those ``top_k`` tokens plus one
  bucket for the rest of the vocabulary. This is exact when the dense top-k hold
  all the mass and otherwise a lower bound of the full KL (coarse-graining never
  increases a divergence). With ``metric="kl"`` the per-sample scores are ``-kl``
  so that higher is better everywhere (the metric is then named ``neg_kl``).

References are keyed by model identity, task, document id and the prompt settings
(shots, seed, ``max_new_tokens``, ``top_k``, dtype), kept in memory and, when the
evaluator has a ResultStore, in the store's database (``ResultStore.save_references``),
so a resumed study, a second worker or a later ``eval`` never regenerates them. A
stored reference whose prompt text no longer matches (changed task data) is
regenerated.

Modules: ``scoring`` (the coarse-grained KL and teacher-forced scoring),
``references`` (generating the dense references), ``evaluator`` (``FidelityEvaluator``,
the ``tuning.Evaluator`` of the objective).
"""
