"""One module per tab. Each ``build(limits)`` lays out its tab inside the current Blocks context and
returns its components as a ``SimpleNamespace`` (settings inputs use the names in
`p2d.studio.fields.FIELD_NAMES`)."""
