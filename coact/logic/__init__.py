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
  when none is, the input that splits its activation within its rows most is added when
  it removes `magnitude_cut` of the within-row variation (a gain that multiplies: B alone
  silent, A with B larger than A alone), which no firing count shows;
- pruned again (an input is also kept when it changes a firing row's mean activation by
  `magnitude_cut`), and the table rebuilt on what is left;
- grown by coverage: while its inputs cover less than `coverage_target` (0.8) of its
  activation mass (Σ of its activation over the tokens where one of its inputs is active)
  and it has fewer than `max_inputs` (the documented cap, 4 by default, at most 6: 64
  rows), the candidate that covers most of the still uncovered mass is added. Candidates:
  the connector's inputs with a positive weight and the jacobian stage's `jacobian_inputs`
  connections of largest positive total attribution Σ J·c (the block's own slope times the
  input's code, summed over the tokens where both fire), each only with lift
  P(T | X) / P(T) ≥ `min_lift` (an input that is on wherever anything is, e.g. on 77 % of
  tokens, covers mass without explaining firing).
The `candidates` column keeps the connector's candidates, `inputs` the final ones (their
`weights` are NaN for inputs added from co-activations or coverage), `sources` how each
was found ("connector", "co-activation", "coverage"). `inputs_needed` is how many
candidates the same greedy search, started from none, needs to cover `coverage_target`
(searching up to `coverage_search`; null: not reached), `coverage_searched` what it
reaches; `jacobian_share` the share of the feature's positive Jacobian attribution its
inputs carry.

Coverage and fit: `coverage` is the share of the target's activation mass on tokens where
one of its truth-table inputs is active; `auc` the AUC, on `heldout_fraction` of the
contexts, of the truth table counted on the others (a token's score: its row's firing rate
there).

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
5. NONLINEAR "xor-like": two inputs each fire the target alone and together are silent.
   NONLINEAR "non-monotone": on some input's one-input row, the mean activation (zeros
   included) over the middle tertile of its values exceeds both outer tertiles' by
   `nonmonotone_cut` of the larger and by three standard errors (a band, a bump).
6. OR ("saturating") or WEIGHTED-SUM ("additive"): some input fires the target alone,
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
   A sum must also be additive and linear in each input's magnitude; otherwise, unless
   it is an OR, it is NONLINEAR: "superadditive" when the ratio Σy / Σ_i β_i x_i over the
   tokens with two or more inputs active (`ratio`) reaches `superadditive_cut` (a product,
   a gain: more than the parts add up to); "curved" when on the one-input row of an input
   that fires it alone, among the tokens where the target is active, a square term removes
   `curvature_cut` of the affine fit's residual (y = a + b·x) with F ≥ `min_g`
   (`curvature`, per input).
7. UNEXPLAINED ("no rule fits"): anything else (a mixed row that no magnitude explains, a
   row that breaks the pattern).
The NONLINEAR label's `kind` names its rule. A product of two inputs that are each silent
alone is an AND (it fires only when both do).

Confidence: the share of `n_boot` bootstrap resamples of the contexts (documents; the
store's `context` column; with no contexts given, every token is its own) that give the
same label (and the same negated input), the inputs held fixed. A resample draws contexts
with replacement and adds up their truth-table cells (counted per context), so a pattern
repeated inside one context counts once per draw of that context, not once per token;
the additivity s and the ratio are drawn from their normal approximations with standard
errors over contexts (the ratio estimator's variance of per-context sums); the magnitude
tests (curved, non-monotone) are held fixed.

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
