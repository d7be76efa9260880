"""Pure tensor functions of the model: plain-torch references (one module per kernel family) and
`ops`, the dispatch layer that the layers import."""
