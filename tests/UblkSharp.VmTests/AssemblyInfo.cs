// The VM tests create ublk devices (by id, through the CLI's `del --all`, and by counting the
// devices the kernel has), mount file systems and measure process-wide counts (threads, fds):
// no two of them may run at once.
[assembly: CollectionBehavior(DisableTestParallelization = true)]
