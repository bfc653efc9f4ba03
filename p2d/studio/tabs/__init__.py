"""One module per tab. Each ``build(ctx)`` lays out its tab inside the current Blocks context, places
the settings inputs it shows (``ctx.form``), binds its own events through ``ctx.bind`` and returns its
components as a ``SimpleNamespace``."""
