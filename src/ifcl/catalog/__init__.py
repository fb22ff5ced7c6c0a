"""ifcl's own methods, one declaration module per method (or per method and its variants): each module's
``METHODS`` holds its :class:`ifcl.registry.Method` records. The registry lists this package, so a module added
here is found with no other change. Declarations import no torch: their implementations are named by module path.
"""
