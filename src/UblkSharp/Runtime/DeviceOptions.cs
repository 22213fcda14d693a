using Microsoft.Extensions.Logging;
using Microsoft.Extensions.Logging.Abstractions;
using UblkSharp.Ublk;

namespace UblkSharp.Runtime;

/// <summary>How to create a ublk device.</summary>
public sealed record DeviceOptions
{
    /// <summary>The device id to ask for; -1 lets the kernel choose.</summary>
    public int DeviceId { get; init; } = -1;

    /// <summary>Hardware queues, each served by its own thread (the kernel clamps to the CPU count).</summary>
    public int Queues { get; init; } = 1;

    /// <summary>Requests in flight per queue.</summary>
    public int Depth { get; init; } = 128;

    /// <summary>The largest request, and each tag's buffer size.</summary>
    public int MaxIoBytes { get; init; } = 512 * 1024;

    /// <summary>UBLK_F_* flags to request beyond the defaults; read the device info for what the kernel kept.</summary>
    public UblkFeatures Flags { get; init; }

    /// <summary>What happens to IO when the daemon dies, and whether the device can be recovered.</summary>
    public RecoveryMode Recovery { get; init; } = RecoveryMode.Off;

    /// <summary>
    /// NO_AUTO_PART_SCAN (Linux 7.0+): START_DEV does not read a partition table, so no /dev/ublkbNpM
    /// appear (a later `blockdev --rereadpt` or `partx -a` still can). Refused on older kernels.
    /// </summary>
    public bool NoPartitionScan { get; init; }

    /// <summary>
    /// Zero copy (AUTO_BUF_REG, Linux 6.16+): the driver installs each request's pages in the queue
    /// ring's buffer table and the target's file IO moves them directly, with no copy through the
    /// daemon's memory. Auto uses it where the target can (<see cref="Targets.BlockTarget.SupportsZeroCopy"/>)
    /// and the driver offers it, for a device added by root; On refuses to add the device otherwise.
    /// </summary>
    public ZeroCopyMode ZeroCopy { get; init; } = ZeroCopyMode.Auto;

    /// <summary>
    /// Batched IO commands (BATCH_IO, Linux 7.0+): a queue fetches many requests per completion and
    /// commits the results of a pass of its loop in one command. Auto uses it where the driver offers
    /// it, except with <see cref="Recovery"/> (a batched device cannot be quiesced, so only one with
    /// reissue can be handed over); On refuses to add the device where the driver lacks it.
    /// </summary>
    public BatchMode Batch { get; init; } = BatchMode.Auto;

    /// <summary>Pin each queue thread to the CPUs blk-mq maps to its queue (GET_QUEUE_AFFINITY).</summary>
    public bool PinQueues { get; init; } = true;

    /// <summary>Bound on START_DEV, which scans partitions through the queues.</summary>
    public TimeSpan StartTimeout { get; init; } = TimeSpan.FromSeconds(60);

    /// <summary>Bound on STOP_DEV and DEL_DEV.</summary>
    public TimeSpan StopTimeout { get; init; } = TimeSpan.FromSeconds(60);

    /// <summary>
    /// Where the device and its queues log (queue failures, IO errors, clean-up trouble); by default
    /// nowhere. Queue threads log only a request's failure, and only the first few of each kind.
    /// </summary>
    public ILoggerFactory LoggerFactory { get; init; } = NullLoggerFactory.Instance;

    public void Validate()
    {
        ArgumentNullException.ThrowIfNull(LoggerFactory);
        if (DeviceId < -1)
        {
            throw new ArgumentOutOfRangeException(nameof(DeviceId), $"The device id must be 0 or more (or -1 for any), not {DeviceId}");
        }
        if (Queues is < 1 or > UblkCommands.MaxQueues)
        {
            throw new ArgumentOutOfRangeException(nameof(Queues), $"Queues must be 1 to {UblkCommands.MaxQueues}, not {Queues}");
        }
        if (Depth is < 1 or > UblkCommands.MaxQueueDepth)
        {
            throw new ArgumentOutOfRangeException(nameof(Depth), $"The queue depth must be 1 to {UblkCommands.MaxQueueDepth}, not {Depth}");
        }
        if (MaxIoBytes < 4096 || MaxIoBytes > 32 << 20 || MaxIoBytes % 4096 != 0)
        {
            throw new ArgumentOutOfRangeException(nameof(MaxIoBytes), $"The IO size limit must be a multiple of 4096 from 4 KiB to 32 MiB, not {MaxIoBytes}");
        }
        if (StartTimeout <= TimeSpan.Zero || StopTimeout <= TimeSpan.Zero)
        {
            throw new ArgumentOutOfRangeException(nameof(StartTimeout), $"The start and stop timeouts must be positive, not {StartTimeout.TotalSeconds} s and {StopTimeout.TotalSeconds} s");
        }
    }
}

/// <summary>Whether a device uses ublk zero copy (<see cref="DeviceOptions.ZeroCopy"/>).</summary>
public enum ZeroCopyMode
{
    /// <summary>Where the target and the driver can (and the device is root's).</summary>
    Auto,

    /// <summary>Always; adding the device fails where it cannot be had.</summary>
    On,

    /// <summary>Never: request data is copied into the daemon's buffers.</summary>
    Off,

    /// <summary>
    /// Zero copy by registering each request's pages explicitly (SUPPORT_ZERO_COPY, Linux 6.15+:
    /// REGISTER_IO_BUF before its backend IO, UNREGISTER_IO_BUF before its commit), even where
    /// AUTO_BUF_REG is offered; adding the device fails where it cannot be had. Auto and On take
    /// this path only on a kernel without AUTO_BUF_REG.
    /// </summary>
    Explicit,
}

/// <summary>The CLI's spellings of <see cref="ZeroCopyMode"/>.</summary>
public static class ZeroCopyModes
{
    public static ZeroCopyMode Parse(string text) => text switch
    {
        "auto" => ZeroCopyMode.Auto,
        "on" => ZeroCopyMode.On,
        "off" => ZeroCopyMode.Off,
        "explicit" => ZeroCopyMode.Explicit,
        _ => throw new ArgumentException($"--zero-copy {text}: use auto, on, off or explicit"),
    };
}

/// <summary>Whether a device uses BATCH_IO (<see cref="DeviceOptions.Batch"/>).</summary>
public enum BatchMode
{
    /// <summary>Where the driver offers it, for a device without recovery.</summary>
    Auto,

    /// <summary>Always; adding the device fails where the driver lacks it.</summary>
    On,

    /// <summary>Never: a FETCH and a COMMIT_AND_FETCH per request.</summary>
    Off,
}

/// <summary>The CLI's spellings of <see cref="BatchMode"/>.</summary>
public static class BatchModes
{
    public static BatchMode Parse(string text) => text switch
    {
        "auto" => BatchMode.Auto,
        "on" => BatchMode.On,
        "off" => BatchMode.Off,
        _ => throw new ArgumentException($"--batch {text}: use auto, on or off"),
    };
}
