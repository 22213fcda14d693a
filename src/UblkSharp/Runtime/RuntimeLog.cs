using Microsoft.Extensions.Logging;
using UblkSharp.Ublk;

namespace UblkSharp.Runtime;

/// <summary>
/// What the device, its queues and deletions log. Source-generated: a call checks IsEnabled before
/// it formats or boxes anything, which matters on queue threads. A message that carries an
/// exception leaves its text out: the provider decides how much of it to show.
/// </summary>
internal static partial class RuntimeLog
{
    [LoggerMessage(EventId = 100, Level = LogLevel.Critical, Message = "a queue thread failed, ending the daemon so the kernel can fail its IO")]
    public static partial void QueueThreadFailed(ILogger logger, Exception exception);

    [LoggerMessage(EventId = 101, Level = LogLevel.Warning, Message = "cleaning up device {Id}: {Reason}")]
    public static partial void CleanUpFailed(ILogger logger, uint id, string reason);

    [LoggerMessage(EventId = 102, Level = LogLevel.Warning, Message = "deleting device {Id}: {Reason}; 'ublksharp del -n {Id}' may remove it later")]
    public static partial void DeleteFailed(ILogger logger, uint id, string reason);

    [LoggerMessage(EventId = 103, Level = LogLevel.Warning, Message = "device {Id}: queue {Queue} did not end within {Seconds:0.#} s")]
    public static partial void QueueDidNotEnd(ILogger logger, uint id, int queue, double seconds);

    [LoggerMessage(EventId = 110, Level = LogLevel.Error, Message = "queue {Queue}: target threw ending the queue")]
    public static partial void TargetThrewEnding(ILogger logger, int queue, Exception exception);

    [LoggerMessage(EventId = 111, Level = LogLevel.Error, Message = "queue {Queue}: target failed to reap completions")]
    public static partial void ReapFailed(ILogger logger, int queue, Exception exception);

    [LoggerMessage(EventId = 112, Level = LogLevel.Error, Message = "queue {Queue}: backend reaped tag {Tag}, which it was not serving; ignored")]
    public static partial void StrayCompletion(ILogger logger, int queue, int tag);

    [LoggerMessage(EventId = 113, Level = LogLevel.Error, Message = "queue {Queue}: target threw completing a step of its own")]
    public static partial void OwnStepThrew(ILogger logger, int queue, Exception exception);

    [LoggerMessage(EventId = 114, Level = LogLevel.Error, Message = "queue {Queue}: target threw {Doing} {Op} at {Offset}")]
    public static partial void TargetThrew(ILogger logger, int queue, string doing, IoOp op, long offset, Exception exception);

    [LoggerMessage(EventId = 115, Level = LogLevel.Error, Message = "queue {Queue}: tag {Tag} ({Op} at {Offset}) committed twice; the second commit is dropped")]
    public static partial void CommittedTwice(ILogger logger, int queue, int tag, IoOp op, long offset);

    [LoggerMessage(EventId = 116, Level = LogLevel.Warning, Message = "queue {Queue}: {Op} of {Length} bytes at {Offset} failed: {Error}")]
    public static partial void IoFailed(ILogger logger, int queue, IoOp op, long length, long offset, string error);

    [LoggerMessage(EventId = 118, Level = LogLevel.Error, Message = "queue {Queue}: the driver took {Taken} of {Count} commits of a COMMIT_IO_CMDS ({Result}); the rest are left unanswered")]
    public static partial void BatchCommitRefused(ILogger logger, int queue, int taken, int count, string result);

    [LoggerMessage(EventId = 117, Level = LogLevel.Warning, Message = "queue {Queue}: target failed to close its backend")]
    public static partial void BackendCloseFailed(ILogger logger, int queue, Exception exception);

    [LoggerMessage(EventId = 120, Level = LogLevel.Warning, Message = "device {Id}: its daemon (pid {Pid}) did not exit within {Seconds:0.#} s of the stop; killing it")]
    public static partial void DaemonKilled(ILogger logger, uint id, int pid, double seconds);

    [LoggerMessage(EventId = 121, Level = LogLevel.Warning, Message = "device {Id}: pid {Pid} still runs {Seconds:0.#} s after the stop; not killing it: {Doubt}")]
    public static partial void DaemonLeftAlone(ILogger logger, uint id, int pid, double seconds, string doubt);
}
