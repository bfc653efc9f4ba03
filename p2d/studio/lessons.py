"""Plain-language notes shown under the app's charts: what a chart shows and what to look for (for
people exploring the method and for teachers demoing it). One place, so the wording stays consistent;
the numbers they mention come from docs/BENCHMARKS.md."""

LESSONS = {
    "heads": (
        "**What this shows:** one square per attention head (rows: layers, columns: heads); brighter = the head "
        "reacts more to the target task than to the rest of the pool. Squares marked red are the heads P2D will "
        "train. **Look for:** whether the selected heads cluster in a few layers, and how far the selected "
        "scores stand above the rest. A map found on ~100 examples is noisy: compare two seeds on the Explore "
        "tab before reading much into single heads."),
    "data": (
        "**What this shows:** every pool row's score against the selected heads, and which tasks the kept rows "
        "come from compared with the pool and with a random draw of the same size. **Look for:** the target "
        "task's share among the kept rows (well above its pool share means the heads found the task). In the "
        "benchmark, random heads find it almost as well as P2D's heads, so ask the controls before crediting "
        "the heads."),
    "train": (
        "**What this shows:** the training loss of the selected heads per step (thin: raw, bold: smoothed), "
        "and the time P2D spent (heads + selection + training) against full fine-tuning of all parameters on "
        "the whole pool. **Look for:** a loss that falls and flattens; the AER is P2D's time divided by the "
        "full fine-tuning time, lower is cheaper. It says nothing about accuracy: Results does."),
    "results": (
        "**What this shows:** exact-match accuracy on held-out target questions before and after training, "
        "and a few answers side by side. **Look for:** the change, and whether the answers changed the way "
        "you wanted (format, not only content)."),
    "forgetting": (
        "**What this shows:** accuracy on a few held-out rows of every other task of the pool, before and "
        "after. **Look for:** drops: training a few heads can still change how the model answers elsewhere. "
        "Five rows per task are a glance, not a measurement."),
    "controls": (
        "**What this shows:** the same training budget spent five other ways: random heads on P2D's data "
        "(do the heads matter?), P2D's heads on random data (does the data matter?), P2D's heads on the rows "
        "a word-matching selector picks without any heads or model (TF-IDF: does the head-guided selection beat "
        "a cheap one?), on the rows whose answer has the probe answers' shape (a number, a date, JSON...; then "
        "TF-IDF: is it more than the answer's form?) and LoRA on P2D's data (the adapter most people use). "
        "**Look for:** a control as good "
        "as P2D means that half of the method is not what helped. One draw each: the benchmark repeats them "
        "over seeds, and there random heads trained better than P2D's (q/k/v/o slices) and TF-IDF rows "
        "better than P2D's where the words give the task away (docs/BENCHMARKS.md)."),
    "chat": (
        "**What this shows:** the same prompt answered by the base model and by the base model with the "
        "trained heads (greedy by default, so answers are repeatable). **Look for:** target-task prompts that "
        "flip from wrong to right, and other prompts that should not change."),
    "head": (
        "**What this shows:** where one head looks: each row is a token, and its row shows how much that token "
        "attends to each earlier token (the dotted line marks where the answer starts). The loss line says "
        "what switching the head off costs the probe answers. **Look for:** heads whose answer rows look at "
        "the numbers or names in the question, and a positive loss change (the answers need the head)."),
    "compare": (
        "**What this shows:** two head maps side by side (two targets, two methods or two seeds) and the "
        "difference of their ranks: red heads rank higher on the left map, blue on the right. Jaccard is "
        "the overlap of the selected sets (1 = the same heads), Spearman the agreement of all scores. "
        "**Look for:** maps of the same task with different seeds should agree more than maps of two tasks."),
}
