"""VMM drivers (adapters behind `arcbox_vm.ports.VmmDriver`)."""
