def run_bench(**kw):
    raise NotImplementedError
