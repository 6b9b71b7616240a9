"""`appliance status`: processes, project, ML connections and the serving model, as text or JSON."""

from __future__ import annotations

import json
import xmlrpc.client
from typing import Any

import requests
from supervisor.xmlrpc import SupervisorTransport

from appliance.labelstudio import state as app_state
from appliance.labelstudio import client as studio_api
from appliance.settings import Settings


def processes(settings: Settings) -> list[dict[str, Any]] | str:
    sock = settings.run_dir / "supervisor.sock"
    if not sock.exists():
        return "supervisord is not running (no socket at %s)" % sock
    transport = SupervisorTransport(None, None, serverurl=f"unix://{sock}")
    proxy = xmlrpc.client.ServerProxy("http://127.0.0.1", transport=transport)
    try:
        infos = proxy.supervisor.getAllProcessInfo()
    except (OSError, xmlrpc.client.Error) as error:
        return f"supervisord does not answer: {error}"
    return [{"name": p["name"], "state": p["statename"], "pid": p["pid"], "uptime": p["description"]} for p in infos]


def project(settings: Settings) -> dict[str, Any] | str:
    state = app_state.read(settings)
    if not state.get("project_id"):
        return "not bootstrapped yet"
    try:
        ls = studio_api.sdk(settings, timeout=5)
        p = ls.projects.get(state["project_id"])
        ml = [{"id": m.id, "title": m.title, "url": m.url, "state": m.state, "model_version": m.model_version}
              for m in ls.ml.list(project=p.id)]
    except Exception as error:  # status must report, not crash
        return f"Label Studio does not answer: {type(error).__name__}"
    return {"id": p.id, "title": p.title, "tasks": p.task_number,
            "annotated_tasks": p.num_tasks_with_annotations, "ml_backends": ml}


def serving_model(settings: Settings) -> dict[str, Any] | str:
    try:
        health = requests.get(f"{settings.predict_base_url}/health", timeout=2,
                              auth=settings.backend_credentials).json()
    except (requests.RequestException, ValueError) as error:
        return f"prediction backend does not answer: {type(error).__name__}"
    return {"model_version": health.get("model_version"), "ready": health.get("ready"),
            "message": health.get("message"), "saving": health.get("saving"), "thresholds": health.get("thresholds")}


def trainer(settings: Settings) -> dict[str, Any]:
    from appliance.trainer.status import StatusFile

    return StatusFile(settings.trainer_dir / "status.json").read() or {"state": "not started"}


def devices(settings: Settings) -> dict[str, Any]:
    """This machine's GPU readiness, and the device the running SAM model reports."""
    from appliance import gpu

    info = {"setting": settings.device, **gpu.report()}
    try:
        info["sam"] = requests.get(f"{settings.sam_base_url}/health", timeout=2,
                                   auth=settings.backend_credentials).json().get("device")
    except (requests.RequestException, ValueError):
        info["sam"] = None
    return info


def shared_state(settings: Settings) -> dict[str, Any] | None:
    """With the roles on several machines: the shared registry's version and this node's, and the training lock."""
    if not settings.shared_state:
        return None
    from appliance.shared.registry import UNREACHABLE, open_registry

    registry = open_registry(settings)
    here = registry.versions_dir.parent / "current"
    info: dict[str, Any] = {"url": settings.shared_state, "this_node": here.resolve().name if here.exists() else None,
                            "training_lock": "PostgreSQL advisory lock" if settings.database_url else "GCS lease"}
    try:
        info["current"] = registry.remote_current()
    except UNREACHABLE as error:
        info["current"] = None
        info["error"] = f"unreachable: {type(error).__name__}"
    return info


def collect(settings: Settings) -> dict[str, Any]:
    return {"processes": processes(settings), "project": project(settings), "serving_model": serving_model(settings),
            "trainer": trainer(settings), "devices": devices(settings), "shared": shared_state(settings)}


def waiting_for(run: dict[str, Any], settings: Settings | None) -> str:
    """What starts the next run, in words."""
    pending = int(run.get("pending_changes") or 0)
    if settings is None:
        return f"{pending} annotation(s) waiting" if pending else ""
    more = max(0, settings.train_min_new - pending)
    quiet = f", or {settings.train_quiet_seconds} s after the last one" if pending else ""
    return (f"{pending} new annotation(s); the next run starts after {more} more{quiet} "
            f"(or now: `appliance train`)")


def render_trainer(run: dict[str, Any], settings: Settings | None = None) -> list[str]:
    state = run.get("state") or "not started"
    detail = waiting_for(run, settings) if state == "idle" else ""
    lines = ["Trainer:", f"  {state}" + (f": {detail}" if detail else "")]
    if run.get("state") == "running":
        eta = f", about {run['eta_s']:.0f} s left" if run.get("eta_s") is not None else ""
        loss = f", loss {run['loss']:.3f}" if run.get("loss") is not None else ""
        lines.append(f"  run {run.get('run')} ({run.get('reason')}): {run.get('stage')}, "
                     f"epoch {run.get('epoch')}/{run.get('max_epochs')}{loss}{eta}")
    if run.get("state") == "interrupted" and run.get("error"):
        lines.append(f"  {run['error']}")
    last = run.get("last")
    if last:
        detail = last.get("version") or last.get("why") or last.get("error") or ""
        lines.append(f"  last run {last.get('run')}: {last.get('result')} {detail} ({last.get('seconds')} s)")
    return lines


def render(report: dict[str, Any], settings: Settings | None = None) -> str:
    lines = ["Processes:"]
    procs = report["processes"]
    lines += [f"  {procs}"] if isinstance(procs, str) else [f"  {p['name']:<10} {p['state']:<9} {p['uptime']}"
                                                             for p in procs]
    proj = report["project"]
    lines.append("Project:")
    if isinstance(proj, str):
        lines.append(f"  {proj}")
    else:
        lines.append(f"  #{proj['id']} {proj['title']!r}: {proj['tasks']} tasks, {proj['annotated_tasks']} annotated")
        lines.append("ML connections:")
        lines += [f"  {m['title']:<30} {m['state']:<4} {m['url']}  version={m['model_version']}"
                  for m in proj["ml_backends"]]
    model = report["serving_model"]
    lines.append("Serving model:")
    lines.append(f"  {model}" if isinstance(model, str) else
                 f"  {model['model_version']}" + (f" ({model['message']})" if model.get("message") else "")
                 + (f": {model['saving']}" if model.get("saving") else ""))
    lines += render_trainer(report["trainer"], settings)
    shared = report.get("shared")
    if shared:
        lines += ["Shared state:", f"  {shared['url']}: " + (shared.get("error") or
                  f"models/current = {shared['current'] or 'none yet'} (this node: {shared['this_node'] or 'none'})"),
                  f"  training lock: {shared['training_lock']}"]
    if "devices" in report:
        from appliance.gpu import summary

        dev = report["devices"]
        lines += ["Devices:", f"  APPLIANCE_DEVICE={dev['setting']}: {summary(dev)}",
                  f"  SAM model on {dev['sam'] or 'unknown (SAM backend not answering)'}"]
    return "\n".join(lines)


def down(report: dict[str, Any]) -> bool:
    """supervisord is not running or not answering, or gave up restarting one of this node's programs (FATAL): what
    a liveness probe (a Kubernetes pod running one role) must restart the container for."""
    procs = report["processes"]
    return isinstance(procs, str) or any(p["state"] == "FATAL" for p in procs)


def main(settings: Settings, as_json: bool) -> int:
    """Prints the report; exit code 1 when the appliance is down (see ``down``)."""
    report = collect(settings)
    print(json.dumps(report, indent=2) if as_json else render(report, settings))
    return 1 if down(report) else 0
