//! (helper A) Lab data-plane benchmark: XDP vs iptables vs nftables NodePort rps/pps.
