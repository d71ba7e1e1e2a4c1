lifeboat-tag 1 25fe65c96a55b33dc4d28592608ed0eb3d86d6c5d0a74237e86b0d6f03cda5a6
{
  "vm": "vm1",
  "disk": "data",
  "seq": 1853070350745600001,
  "from_segment": 1853070350745600001,
  "through_segment": 1853070350745600001,
  "time": 1767225600000,
  "consistency": "crash",
  "block_size": 4096,
  "shape": {
    "kind": "directory",
    "tree": "09901d261e18ea5fec564c899ed8ec85c259e9242ab2e80c59914c0d00a5eebe"
  }
}