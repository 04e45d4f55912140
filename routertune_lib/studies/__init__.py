"""The experiments of the reproduction notebooks, one module per study (paper section).

Each study module holds its ``SETTINGS`` per profile, ``run(profile) -> Study`` (runs the experiment, writes its
tables and ``run.json`` under ``results/<notebook>/<profile>/``), the figure functions (``plot*``, which save the PNGs)
and ``verdict(study) -> str`` (what holds at this scale). :mod:`.protocol` holds what they share.

* :mod:`.granularity` — 01, Table 2 (what to route, per what)
* :mod:`.speed_accuracy` — 02, headline sweep, Figures 2 and 4
* :mod:`.generation` — 03, Figure 3 (generation vs attention drop)
* :mod:`.cost` — 04, Table 4 (training cost)
* :mod:`.num_layers` — 05, Figures 5 and 6 (how many layers)
* :mod:`.across_models` — 06, Table 5
* :mod:`.training_data` — 07, Table 6 and Figure 7
* :mod:`.experts` — 08, Table 7 and Figure 8 (MoE)
* :mod:`.lora` — 09, Table 8 (LoRA)
"""
