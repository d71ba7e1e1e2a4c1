lifeboat-tag 1 f0bdcf09d9950ad622957719da596b0c6e6bc10755a4b538067c791cecb522ff
{
  "vm": "vm1",
  "disk": "data",
  "seq": 1,
  "from_segment": 1,
  "through_segment": 1,
  "time": 1767225600000,
  "consistency": "crash",
  "block_size": 4096,
  "shape": {
    "kind": "directory",
    "tree": "09901d261e18ea5fec564c899ed8ec85c259e9242ab2e80c59914c0d00a5eebe"
  }
}