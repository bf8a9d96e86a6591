"""What an SMS says, in the site's language (Chinese and English built in).

Short, so that an alarm fits in one part where possible (70 characters in UCS-2, the encoding Chinese needs):
the building, unit, household, what was detected, and the time. Gammu splits a longer text into parts that the
phone joins again.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

__all__ = ["LANGUAGES", "event_text", "technician_test_text"]

_WHAT: dict[str, dict[str, str]] = {
    "zh": {"high": "燃气浓度高", "low": "燃气浓度超标", "fire": "火警", "removed": "灭火器被移走",
           "pressure": "灭火器压力异常", "door_open": "消防柜门未关", "obstructed": "消防设施被遮挡",
           "alarm": "报警", "supervisory": "监视信号"},
    "en": {"high": "high gas", "low": "gas", "fire": "fire", "removed": "extinguisher removed",
           "pressure": "extinguisher pressure low", "door_open": "cabinet door open",
           "obstructed": "extinguisher obstructed", "alarm": "alarm", "supervisory": "supervisory signal"},
}
_HEAD: dict[str, dict[tuple[str, str], str]] = {
    "zh": {("alarm", "raised"): "【报警】", ("alarm", "escalated"): "【报警升级】",
           ("alarm", "cleared"): "【报警解除】",
           ("supervisory", "raised"): "【消防监视】", ("supervisory", "cleared"): "【监视解除】",
           ("fault", "raised"): "【故障】", ("fault", "cleared"): "【故障恢复】"},
    "en": {("alarm", "raised"): "ALARM", ("alarm", "escalated"): "ALARM RISING", ("alarm", "cleared"): "ALARM CLEARED",
           ("supervisory", "raised"): "SUPERVISORY", ("supervisory", "cleared"): "SUPERVISORY CLEARED",
           ("fault", "raised"): "FAULT", ("fault", "cleared"): "FAULT CLEARED"},
}
LANGUAGES = tuple(_WHAT)


def _when(wall: float) -> str:
    return time.strftime("%m-%d %H:%M", time.localtime(wall))


def event_text(event: Mapping[str, Any], *, building: str, language: str) -> str:
    """The message for an alarm, supervisory or fault event (its stored fields)."""
    what_names = _WHAT[language]
    kind, action = str(event.get("kind")), str(event.get("action"))
    head = _HEAD[language].get((kind, action), _HEAD[language].get((kind, "raised"), kind))
    if kind == "alarm":
        what = what_names.get(str(event.get("level")), what_names["alarm"])
        value = event.get("value")
        if value is not None and event.get("measure"):
            what += f" {value:g}{event['measure']}" if language == "zh" else f" {value:g} {event['measure']}"
    elif kind == "supervisory":
        what = what_names.get(str(event.get("code")), what_names["supervisory"])
    else:
        what = str(event.get("code") or "fault") + (f" {event['device']}" if event.get("device") else "")
    unit, household = event.get("unit"), event.get("household")
    when = _when(float(event.get("wall") or time.time()))
    if language == "zh":
        place = f"{building}楼" + (f"{unit}单元" if unit else "") + (f"{household}户" if household else "")
        tail = "请立即处理！" if kind == "alarm" and action != "cleared" else ""
        return f"{head}{place}：{what}，{when}。{tail}"
    place = f"bldg {building}" + (f" unit {unit}" if unit else "") + (f" flat {household}" if household else "")
    tail = " Act now!" if kind == "alarm" and action != "cleared" else ""
    return f"{head}: {place}: {what}, {when}.{tail}"


def technician_test_text(*, building: str, language: str, wall: float | None = None) -> str:
    """The message of ``gatewayctl sms test``: it says it is a test."""
    when = _when(time.time() if wall is None else wall)
    if language == "zh":
        return f"【测试】{building}楼安全网关测试短信，{when}，无需处理。"
    return f"TEST message from the safety gateway of bldg {building}, {when}. No action needed."
