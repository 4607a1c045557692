"""One folder per op: interface (public function, custom ops, autograd) and one file per backend."""
