"""EAGLE and EAGLE-3 heads: one-layer drafters that read the target's hidden states.

`checkpoint` loads (and writes) the published layouts, `head` is the module, `drafter` runs
it behind the Drafter interface, `train` fits a head for a catalogue target on CPU.
"""
