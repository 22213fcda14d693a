using UblkSharp.Interop;

namespace UblkSharp.Targets;

/// <summary>What a request's steps move: data into a buffer, data out of one, or neither.</summary>
internal enum StepKind : byte
{
    Read,
    Write,
    Other,
}

/// <summary>
/// How far one request has got, and the single policy for a backend step's result, shared by the
/// ublk queues, the NBD server and the write-zeroes fill-in: a short READ or WRITE continues with
/// the remainder only; -EAGAIN and -EINTR repeat the step, up to <see cref="MaxRetries"/> times in
/// a row, then fail with -EIO; a READ step of 0 bytes (past the end of a shorter backing file)
/// ends the request, the rest reading as zeros (<see cref="ZeroRest"/>); a WRITE step of 0 bytes
/// would repeat forever, so it fails with -EIO. A struct, so it lives in per-tag or per-call state
/// and allocates nothing.
/// </summary>
internal struct RequestProgress
{
    public const int MaxRetries = 1000;

    private readonly long _length;
    private readonly StepKind _kind;
    private long _done;
    private int _retries;

    public RequestProgress(StepKind kind, long length)
    {
        _kind = kind;
        _length = length;
    }

    public readonly long Length => _length;

    /// <summary>Bytes of a READ/WRITE already done; the next step starts here.</summary>
    public readonly long Done => _done;

    public readonly long Remaining => _length - _done;

    /// <summary>After a successful READ: the bytes from <see cref="Done"/> on were never read and must be zeroed.</summary>
    public readonly bool ZeroRest => _kind == StepKind.Read && _done < _length;

    /// <summary>
    /// Accounts one step's result (bytes done, or a negative errno). True: run the step again, for
    /// <see cref="Remaining"/> bytes from <see cref="Done"/>. False: the request is finished, with
    /// <paramref name="error"/> 0 (every byte done, or see <see cref="ZeroRest"/>) or a negative errno.
    /// </summary>
    public bool Next(int result, out int error)
    {
        error = 0;
        if (result is -Errno.EAGAIN or -Errno.EINTR)
        {
            if (++_retries <= MaxRetries)
            {
                return true;
            }
            error = -Errno.EIO;
            return false;
        }
        if (result < 0)
        {
            error = result;
            return false;
        }
        if (_kind == StepKind.Other)
        {
            return false;
        }
        if (result == 0)
        {
            if (_kind == StepKind.Write)
            {
                error = -Errno.EIO;
            }
            return false;
        }
        _retries = 0;
        _done += Math.Min(result, Remaining);
        return _done < _length;
    }
}
