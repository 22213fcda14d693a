using Microsoft.Extensions.Logging;

namespace UblkSharp.Targets;

/// <summary>What the targets that talk to a server (nbd, rbd) log.</summary>
internal static partial class TargetLog
{
    [LoggerMessage(EventId = 300, Level = LogLevel.Warning, Message = "nbd {Uri} (queue {Queue}): {What}")]
    public static partial void NbdConnection(ILogger logger, string uri, int queue, string what);

    [LoggerMessage(EventId = 301, Message = "nbd {Uri}: connected over TLS ({Tls})")]
    public static partial void NbdTls(ILogger logger, LogLevel level, string uri, string tls);

    [LoggerMessage(EventId = 310, Level = LogLevel.Information, Message = "rbd: the image {Image} was resized from {Old} to {New} bytes; the device follows it")]
    public static partial void RbdResizeFollowed(ILogger logger, string image, long old, long @new);

    [LoggerMessage(EventId = 311, Level = LogLevel.Warning, Message = "rbd: the image {Image} was resized from {Old} to {New} bytes; the device keeps its size of {Size} bytes{Why}")]
    public static partial void RbdResizeNotFollowed(ILogger logger, string image, long old, long @new, long size, string why);

    [LoggerMessage(EventId = 312, Level = LogLevel.Error, Message = "rbd: header watch")]
    public static partial void RbdWatchFailed(ILogger logger, Exception exception);

    [LoggerMessage(EventId = 313, Level = LogLevel.Warning, Message = "rbd: took over the exclusive lock of {Image} from {Owner} (the dead daemon's client), blocklisted first so it can never write again")]
    public static partial void RbdLockBroken(ILogger logger, string image, string owner);
}
