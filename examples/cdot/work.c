/* The editable surface of the cdot test harness: the sum of squares of x[0..n). */
double work(const double *x, long n)
{
    double s = 0.0;
    for (long i = 0; i < n; i++)
        s += x[i] * x[i];
    return s;
}
