"""The LoRA conformance suite: frozen cases, bound-derived tolerances, and a runner.

A *case* is a directory ``conformance/cases/<group>/<case>/`` holding ``case.json`` (the
operation, its parameters, the storage dtype, the output names and the error bound of each
output), ``inputs.safetensors`` (every input, stored in the case's dtype, PEFT layout) and
``expected.safetensors`` (the exact result of each output rounded once to float64, plus the
magnitude the bound needs). See SPEC.md, section "Conformance". The cases ship inside the
package as ``lora_ref/conformance/suite`` (:func:`.casefile.default_suite`).

Modules: :mod:`.exact` (exact dyadic arithmetic for the oracle), :mod:`.bounds` (forward
error bounds and the per-element check), :mod:`.operations` (the table operation -> oracle +
bound depth; Linear), :mod:`.layer_operations` (Embedding, mixed batch, Linear DoRA),
:mod:`.conv_operations` (Conv1d/2d/3d), :mod:`.dora_operations` (DoRA on Embedding and Conv2d),
:mod:`.combine_operations` (weighted combination), :mod:`.catalog` (the list of frozen cases), :mod:`.generator` (writes them),
:mod:`.casefile` (reads and validates a case directory), :mod:`.layouts` (PEFT / mlx-lm
conventions), :mod:`.runner` (in-process and subprocess drivers), :mod:`.report`
(table, JSON, JUnit), :mod:`.reference_impl` (lora_ref itself as an implementation),
:mod:`.bridge` (any in-process implementation behind the subprocess protocol).
"""

#: Version of the case format and of the frozen case set; bump when a vector moves on purpose.
SUITE_VERSION = "2.0.0"


class Refusal(Exception):
    """Raise from ``run(op, params, inputs)`` to refuse a case's inputs (SPEC C.4, expected refusals).

    The in-process protocol counts as a refusal this class, any :class:`lora_ref.errors.LoraRefError`,
    and any ``ValueError`` or ``IndexError`` (what NumPy and torch raise for a shape mismatch or an
    index out of range); through the subprocess protocol a refusal is exit status 3, or a
    ``refused <why>`` line in persistent mode. Returning outputs for a case whose expected outcome
    is a refusal (wrapping an index, clamping it, broadcasting a mismatched factor) fails the case.
    """
