"""Pure attention functions, one module per family.

Every op has a float32 token-loop oracle (``mode="recurrent"`` or a plain reference) and
fast paths behind ``mode=``; see ``shared/DESIGN.md`` for the conventions.
"""
