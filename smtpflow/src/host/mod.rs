//! The host around the programs: the kernel's pressure signals ([`pressure`]: conntrack fill and
//! drops, TCP counters, the SMTP listeners' accept queues) and the process's own privileges
//! ([`privileges`]).
pub mod pressure;
pub mod privileges;
