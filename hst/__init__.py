"""HST: a key-routed mixture-of-experts language model for continual learning.

Modules (flat, one concept each): ``config`` (typed configs), ``data`` (corpora, records,
splits, byte tokens), ``router`` (KeyRouter, learned router), ``experts`` (ReLU² experts, MoE
dispatch, growth), ``model`` (the transformer), ``train`` (the training loop), ``evaluation`` (BPB, routing and the
cycle report's forgetting and absorption), ``metrics``
(routing metrics), ``sampler`` (Smart Sampler logging of routed records), ``coreset``
(per-expert coresets), ``checkpoint`` (self-describing checkpoints), ``plots`` (PNG figures),
``io`` (atomic writes committed together, artifact JSON), ``promotion`` (the champion gate and
alarms), ``tracking`` (MLflow runs and the registry mirror of the gate), ``inbox`` (claiming dropped
text files exactly once), ``novelty`` (the growth trigger and gates), ``grow``, ``generate``
(replay-free samples), ``consolidate`` (targeted consolidation), ``cycle`` (what a cycle does: the `learn` stage's work),
``runs`` (reading finished runs and DVC experiments for the studies in ``scripts/``). Importing the
package has no side effects.
"""
