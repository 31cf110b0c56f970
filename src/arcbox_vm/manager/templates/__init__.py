"""Template use cases: build (build.py, runner.py), the layer cache (layers.py), records and
removal (records.py), sandboxes made from a template (create.py), the facade's methods
(facade.py). The Dockerfile parser and the build context are in `arcbox_vm.templates`."""
