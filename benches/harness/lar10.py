"""Lár 2.1.0 per step on a 10-node graph shaped like lar-worker's `benches/executor.rs`
(set, set, router, 3 tools, router, 2 tools, set). Two ways: the signed log written
(GraphExecutor(hmac_secret, log_dir)) and no file (an AuditLogger whose save is a no-op).
Prints CPU µs per step."""
import contextlib, hashlib, os, shutil, sys, tempfile, time
os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
with contextlib.redirect_stdout(open(os.devnull, "w")), contextlib.redirect_stderr(open(os.devnull, "w")):
    from lar import AddValueNode, GraphExecutor, RouterNode, ToolNode
    from lar.logger import AuditLogger

def sum_numbers(numbers): return sum(numbers)
def upper_text(text): return text.upper()
def digest(v): return hashlib.sha256(str(v).encode()).hexdigest()[:16]
def echo(d1, shout): return {"d1": d1, "shout": shout}

done = AddValueNode(key="status", value="done")
digest_text = ToolNode(tool_function=digest, input_keys=["shout"], output_key="d2", next_node=done)
merge = ToolNode(tool_function=echo, input_keys=["d1", "shout"], output_key="merged", next_node=digest_text)
check = RouterNode(decision_function=lambda s: s.get("status"), path_map={"received": merge})
digest_total = ToolNode(tool_function=digest, input_keys=["total"], output_key="d1", next_node=check)
upper = ToolNode(tool_function=upper_text, input_keys=["text"], output_key="shout", next_node=digest_total)
sum_ = ToolNode(tool_function=sum_numbers, input_keys=["numbers"], output_key="total", next_node=upper)
route = RouterNode(decision_function=lambda s: s.get("kind"), path_map={"sum": sum_})
copy = AddValueNode(key="label", value="hello lár", next_node=route)
start = AddValueNode(key="status", value="received", next_node=copy)

class NoFile(AuditLogger):
    def save_to_file(self, *a, **k): return None

def job():
    return {"kind": "sum", "numbers": [1, 2, 3, 4.5], "text": "hello lár", "job": {"id": 7}}

def measure(make, n):
    steps = 0
    c0 = time.process_time()
    with contextlib.redirect_stdout(open(os.devnull, "w")):
        for _ in range(n):
            ex = make()
            for _ in ex.run_step_by_step(start, job()):
                steps += 1
    return (time.process_time() - c0) / steps * 1e6, steps / n

n = int(sys.argv[1]) if len(sys.argv) > 1 else 2000
d = tempfile.mkdtemp(prefix="lar10_")
signed, per = measure(lambda: GraphExecutor(hmac_secret="bench-secret", log_dir=d), n)
nofile, _ = measure(lambda: GraphExecutor(logger=NoFile(d, hmac_secret="bench-secret")), n)
files = len(os.listdir(d))
print(f"lar 10-node: {per:.0f} steps/run, signed log {signed:.1f} CPU us/step, no file {nofile:.1f} CPU us/step, {files} files")
shutil.rmtree(d)
