"""Logic labels: which computation turns a feature's inputs into its activation.

A target is an output feature (its inputs: its strongest connections in a connector's
weights table) or a hidden latent of the sae-connector (`hidden_targets`). Everything below
is counted on tokens, with no model fitted.

Binarising. A feature is active on a token when its value exceeds `floor` × its median
active (non-zero) value. The floor is relative, so one setting serves features of every
scale; at the default 0.1 it keeps more than 99 % of the activations SAEs emit (on the
SmolLM2 layer-3 codes 0.6 % of input and 0.2 % of output activations lie below a tenth of
their feature's median) and drops only slivers, which a threshold-like computation
produces just above its threshold. An input below its floor counts as inactive and as 0.

Inputs. A target's candidates are its strongest connections in the weights table by
standardised weight |w|·sd(x_i)/sd(y) (connect's `standardised` column; computed when
absent), at least `min_standardised` and `relative_cut` × its strongest, at most
`max_inputs`. A linear connector under-weights exactly the inputs a gate needs: a veto
matters only on the tokens where it meets the input it vetoes, the second input of an AND
only where it meets the first, and L1 shrinks the weaker parts of a sum to zero. So the
candidates are then, in turn:

- pruned (`prune`): an input is kept when some pair of observed rows (below) that differ
  only in it differ in their verdict (silent / mixed / fires); one that never changes the
  truth table is dropped;
- completed (`complete`): while a target has fewer than `max_inputs`, the input with the
  largest conditional mutual information I(T; X | current row), from counts, is added when
  its G = 2·N·ln 2·I reaches `min_g` (under independence G is χ² with one degree of
  freedom per row: chance reaches 30 with p < 5e-6 for up to four rows);
- pruned again, and the table rebuilt on what is left.
The `candidates` column keeps the connector's candidates, `inputs` the final ones (their
`weights` are NaN for inputs added from co-activations).

Truth table. With the target's k inputs (k ≤ `max_inputs`), each token falls in one row:
the set of inputs active on it (a bit pattern, bit j for input j of `inputs`, left to
right; the empty row is "none active"). Per row: tokens, tokens where the target is
active, P(target active) and its mean activation. A row is observed when it has at least
`min_tokens` tokens; an observed row fires when P ≥ `p_fire`, is silent when P ≤
`p_silent`, and is mixed in between.

The rules, in plain words, applied in this order (the `rule` column names the one used):

1. DEAD ("dead"): the target is never active in the sample.
2. UNEXPLAINED ("no inputs", "uncovered"): it has no inputs left, or more than
   `max_uncovered` of its activations happen on tokens where none of its inputs is active
   (the inputs do not account for most of it).
3. A-AND-NOT-B ("veto"): some input A fires the target alone (its one-input row fires),
   the row where A and another input B are active (and no other of its inputs) is silent,
   and B alone does not fire it. B is the negated input (when several qualify: the one
   whose row with its A has most tokens).
4. AND ("conjunction"): no input fires the target alone (every observed one-input row is
   silent), and some row with two or more inputs fires.
5. OR ("saturating") or WEIGHTED-SUM ("additive"): some input fires the target alone,
   every observed row that contains such an input fires, and every other observed row
   (only inputs that do not fire it alone) is silent. The two differ in how activations
   combine when several inputs fire together. Each input's effect alone is the
   least-squares slope β_i (through 0) of the target on that input over its one-input
   row; on tokens where two or more inputs with β_i > 0 are active, additivity
   s = Σ(y − max_i β_i x_i) / Σ(Σ_i β_i x_i − max_i β_i x_i) is 1 for a sum and 0 for a
   saturating OR (the target no larger than its largest part). s < `additive_cut` is OR,
   otherwise WEIGHTED-SUM. When fewer than `min_tokens` such tokens are seen, the inputs
   (nearly) never fire together and co-activations cannot tell OR from a sum: the label
   is WEIGHTED-SUM, what a linear connector computes ("additivity untested", s NaN).
6. UNEXPLAINED ("no rule fits"): anything else (a mixed row; a row that breaks the
   pattern, e.g. XOR, where A and B each fire it and together do not).

Confidence: the share of `n_boot` bootstrap resamples of the tokens that give the same
label (and the same negated input), the inputs held fixed. Resampling tokens resamples
the truth table's cells (row × target active or not) multinomially, which is what is
drawn; the additivity s is drawn from its normal approximation (delta-method standard
error over tokens). Tokens, not contexts, are the unit: the confidence is optimistic
where contexts repeat a pattern.

Mutual information (bits), from the truth table's counts: I(T; X_i) per input, I(T; row)
for the whole pattern, and synergy = I(T; row) − Σ_i I(T; X_i) (the whole minus the sum of
its parts; for two inputs it is minus the co-information). Positive synergy means the
inputs tell more together than apart (XOR-like), negative means they repeat each other
(co-firing inputs). It does not tell AND from OR: complementing every bit turns one into
the other and leaves every mutual information unchanged, so for independent inputs AND
and OR have equal synergy; the labels come from the truth table.

Co-activation clusters (of the features whose inputs cover them: not DEAD, "no inputs" or
"uncovered"): HDBSCAN (scikit-learn's; a cluster holds at least
`min_cluster_size` tokens and `min_cluster_share` of the sample) over the inputs'
activation vectors, each input divided by its median active value, on a systematic sample
(every n-th token) of at most `max_cluster_points` tokens where the target fires (its
modes: "A large, B small" versus "B large, A small"), and separately on tokens where some
input fires but the target does not (what suppresses it). Per cluster: tokens in the
sample, their share, the tokens it stands for, the centroid in raw units and the target's
mean activation.
"""
