fn main() { println!("{}", kube2iam_agent::EBPF_OBJECT.len()); }
