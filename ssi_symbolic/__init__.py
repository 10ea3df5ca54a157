"""ssi-symbolic: exact overlap equations of SGD on sequence single-index models.

Pipeline (one module per stage): spec -> gaussian -> derive -> codegen -> numeric users
(evaluate, ...) and latex; cli is a thin command line over them.
"""
__version__ = "0.1.0"
