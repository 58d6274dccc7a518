"""Demo client: one msgpack write and one read against a running RaftKV node.

Usage: python test_client.py [BASE_URL]   (default http://localhost:8080)
Exits non-zero if the write is not acknowledged or the value does not read back.
"""
import sys
import urllib.error
import urllib.parse
import urllib.request

import msgpack

BASE_URL = sys.argv[1] if len(sys.argv) > 1 else "http://localhost:8080"


def send(key: str, value: str) -> tuple[int, str]:
    body = msgpack.packb({"op": "SET", "key": key, "value": value}, use_bin_type=True)
    req = urllib.request.Request(f"{BASE_URL}/insert-val", data=body, method="POST",
                                 headers={"Content-Type": "application/msgpack"})
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()
    except urllib.error.URLError as e:
        return 0, f"cannot reach {BASE_URL}: {e.reason} (is the cluster up? `raftkv cluster up`)"


def get(key: str) -> tuple[int, str]:
    url = f"{BASE_URL}/get-val?{urllib.parse.urlencode({'key': key})}"
    try:
        with urllib.request.urlopen(url, timeout=10) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()
    except urllib.error.URLError as e:
        return 0, f"cannot reach {BASE_URL}: {e.reason}"


if __name__ == "__main__":
    key, value = "user_123", "msgpack_optimization_active"
    status, text = send(key, value)
    print(f"Response Status: {status}")
    print(f"Response Body: {text}")
    if status != 200:
        sys.exit(1)
    # No sleep needed: reads are linearizable, so an acknowledged write is visible at once.
    status, text = get(key)
    print(f"GET Verification for '{key}': {text}")
    sys.exit(0 if status == 200 and text == value else 1)
