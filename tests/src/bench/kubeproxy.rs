//! (helper A) kube-proxy iptables/nftables rule generators and iptables-restore/nft timings.
