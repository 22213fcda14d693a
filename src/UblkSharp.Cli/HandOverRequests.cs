using UblkSharp.Interop;
using UblkSharp.Runtime;

namespace UblkSharp.Cli;

/// <summary>
/// `ublksharp upgrade` asks the daemon serving a device to hand it over (<see cref="UblkDevice.HandOver"/>)
/// once the new daemon is warm. As with <see cref="ResizeRequests"/>, the request is a file, ID.handover
/// (a token, written whole and renamed in), seen on the daemon's next turn of its wait loop; the
/// answer, ID.handover-TOKEN.done, is "ok N" (N requests left for the next daemon) or "error MESSAGE".
/// </summary>
internal static class HandOverRequests
{
    private static string RequestPath(uint id) => Path.Combine(DeviceRecord.Directory, $"{id}.handover");

    private static string AnswerPath(uint id, string token) => Path.Combine(DeviceRecord.Directory, $"{id}.handover-{token}.done");

    /// <summary>CLI side: asks for the hand-over and waits for the answer; the requests left for the next daemon.</summary>
    public static long Send(uint id, int daemonPid, TimeSpan timeout)
    {
        var token = Guid.NewGuid().ToString("N")[..12];
        var path = RequestPath(id);
        StateDirectory.WriteAtomically(path, token);
        var answerPath = AnswerPath(id, token);
        var deadline = Environment.TickCount64 + (long)timeout.TotalMilliseconds;
        try
        {
            while (true)
            {
                if (File.Exists(answerPath))
                {
                    var answer = File.ReadAllText(answerPath).Trim();
                    File.Delete(answerPath);
                    if (answer.StartsWith("ok ", StringComparison.Ordinal) && long.TryParse(answer[3..], out var left))
                    {
                        return left;
                    }
                    throw new IOException(answer.StartsWith("error ", StringComparison.Ordinal) ? answer[6..] : $"an unreadable answer: {answer}");
                }
                if (!Processes.IsAlive(daemonPid))
                {
                    throw new IOException($"its daemon (pid {daemonPid}) ended before it answered");
                }
                if (Environment.TickCount64 > deadline)
                {
                    throw new TimeoutException($"its daemon (pid {daemonPid}) did not answer within {timeout.TotalSeconds:0} s");
                }
                // The stall of the device's IO has begun once the daemon saw the request: poll closely.
                Thread.Sleep(1);
            }
        }
        finally
        {
            // A request the daemon never took must not be taken later by surprise.
            try
            {
                if (File.Exists(path) && File.ReadAllText(path).Trim() == token)
                {
                    File.Delete(path);
                }
            }
            catch (IOException)
            {
            }
        }
    }

    /// <summary>Daemon side: the token of a pending request (taken away), or null.</summary>
    public static string? Take(uint id)
    {
        var path = RequestPath(id);
        try
        {
            var token = File.ReadAllText(path).Trim();
            File.Delete(path);
            return token.Length > 0 ? token : null;
        }
        catch (Exception e) when (e is FileNotFoundException or DirectoryNotFoundException)
        {
            return null;
        }
    }

    /// <summary>Daemon side: the answer to request <paramref name="token"/>.</summary>
    public static void Answer(uint id, string token, string answer) => StateDirectory.WriteAtomically(AnswerPath(id, token), answer);
}
