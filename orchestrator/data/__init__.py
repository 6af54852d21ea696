"""Driver-side data: corpora (presets, text files, hub datasets through `datasets`) and the seeded
token windows drawn from them. Nothing here runs in an actor."""
